"""Text encoders: prompts -> token features, key-padding mask, pooled vector."""
from .base import TextEmbedding, TextEncoder
from .class_cond import ClassConditioner
from .hf import HFTextEncoder, PromptTruncationWarning, RandomTextEncoder, resolve_short_name

__all__ = ["TextEmbedding", "TextEncoder", "HFTextEncoder", "RandomTextEncoder", "PromptTruncationWarning",
           "resolve_short_name"]
