"""Positional encodings over the scale pyramid: STAR's normalized 2D RoPE, plain 2D RoPE,
and VAR's learned absolute embedding. ``apply_rotary`` is what attention layers call."""
from .absolute import LearnedAbsolutePE
from .base import PositionalEncoding, token_grid
from .rope import NormalizedRoPE2D, RoPE2D, apply_rotary, rope_angles, rope_frequencies

__all__ = ["PositionalEncoding", "token_grid", "NormalizedRoPE2D", "RoPE2D", "LearnedAbsolutePE", "apply_rotary",
           "rope_angles", "rope_frequencies"]
