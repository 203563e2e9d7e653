"""Positional encodings over the scale pyramid: STAR's normalized 2D RoPE, plain 2D RoPE,
and VAR's learned absolute embedding. ``apply_rotary`` is what attention layers call."""
from .absolute import LearnedAbsolutePE
from .base import PositionalEncoding, token_grid
from .rope import NormalizedRoPE2D, RoPE2D, apply_rotary, as_cis, rope_angles, rope_frequencies, rotate_float32

__all__ = ["PositionalEncoding", "token_grid", "NormalizedRoPE2D", "RoPE2D", "LearnedAbsolutePE", "apply_rotary",
           "as_cis", "rotate_float32", "rope_angles", "rope_frequencies"]
