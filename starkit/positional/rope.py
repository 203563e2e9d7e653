"""2D rotary position embeddings (axial RoPE) over the scale pyramid.

Layout (the official STAR code's, so that its checkpoints convert): each head of dim ``d``
has ``d/2`` rotary pairs acting on adjacent channels ``(2p, 2p+1)`` (the complex view of
``x.reshape(..., d/2, 2)``). The first ``d/4`` pairs turn by ``x * theta_k`` and the last
``d/4`` by ``y * theta_k``, with ``theta_k = base ** (-k / (d/4))``, ``k = 0 .. d/4-1``
(16 frequencies per axis at head dim 64). ``x`` is the column and ``y`` the row of a token,
either normalized so that every scale spans ``[0, norm]`` (:class:`NormalizedRoPE2D`, STAR)
or plain token indices (:class:`RoPE2D`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .base import PositionalEncoding, token_grid


def rope_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """The ``d/4`` per-axis frequencies ``theta_k = base ** (-k / (d/4))``, float64 ``(d/4,)``."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4 (2 axes x complex pairs), got {head_dim}.")
    n = head_dim // 4
    return float(base) ** (-torch.arange(n, dtype=torch.float64) / n)


def rope_angles(xy: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Rotation angle of every rotary pair.

    Args:
        xy: positions ``(l, 2)`` as (x, y) = (column, row) coordinates.
        head_dim: the per-head channel count d.
        base: the frequency base.

    Returns:
        float64 angles ``(l, d/2)``: x-pairs first, then y-pairs.
    """
    theta = rope_frequencies(head_dim, base)  # (d/4,)
    xy = xy.to(torch.float64)
    return torch.cat([torch.outer(xy[:, 0], theta), torch.outer(xy[:, 1], theta)], dim=-1)  # (l, d/2)


def as_cis(rotary) -> Optional[torch.Tensor]:
    """Rotary tables as one complex tensor ``cos + i sin`` (complex64, ``(l, d/2)`` or ``(B, l, d/2)``):
    accepts a ``(cos, sin)`` pair, an already complex tensor, or None. Build it once per forward pass
    and hand it to every layer."""
    if rotary is None or (torch.is_tensor(rotary) and rotary.is_complex()):
        return rotary
    cos, sin = rotary
    return torch.complex(cos.float(), sin.float())


def rotate_float32(x: torch.Tensor, cis) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(2p, 2p+1)`` of a float32 ``x`` ``(B, H, l, d)`` by ``cis``
    (:func:`as_cis`): one complex multiplication, the pairwise formula
    ``(x0 cos - x1 sin, x0 sin + x1 cos)``. Returns float32 ``(B, H, l, d)``.

    ``cis`` may also be the real ``(cos, sin)`` pair, for ``torch.compile`` (its code generation has no
    complex operators): ``x * [cos, cos] + x[j ^ 1] * [-sin, sin]`` per pair, the same products without a
    concatenation, which Inductor turns into masked branches per element (an instruction-bound kernel at head
    dim 64: ``benchmarks/bench_head.py``)."""
    if isinstance(cis, tuple):
        cos, sin = (t.float() for t in cis)
        if cos.dim() == 3:  # (B, l, d/2) -> (B, 1, l, d/2)
            cos, sin = cos[:, None], sin[:, None]
        cos_d = cos.unsqueeze(-1).expand(*cos.shape, 2).flatten(-2)  # (.., l, d): cos of each channel's pair
        sin_d = (sin.unsqueeze(-1) * sin.new_tensor([-1.0, 1.0])).flatten(-2)  # (.., l, d): -sin, +sin
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (B, H, l, d): channel j holds x[j ^ 1]
        return x * cos_d + swapped * sin_d
    if cis.dim() == 3:  # per-sample positions (B, l, d/2) -> (B, 1, l, d/2)
        cis = cis[:, None]
    pairs = x.unflatten(-1, (-1, 2))  # (B, H, l, d/2, 2)
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-2]):
        pairs = pairs.contiguous()
    return torch.view_as_real(torch.view_as_complex(pairs) * cis).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(2p, 2p+1)`` of ``x`` by the tables' angles.

    Computed in float32 (:func:`rotate_float32`: one complex multiplication by ``cos + i sin``)
    and cast back to ``x``'s dtype.

    Args:
        x: queries or keys ``(B, H, l, d)``.
        cos: ``(l, d/2)``, or ``(B, l, d/2)`` for per-sample positions.
        sin: same shape as ``cos``.

    Returns:
        The rotated tensor, ``(B, H, l, d)`` in ``x``'s dtype.
    """
    return rotate_float32(x.float(), as_cis((cos, sin))).to(x.dtype)


class _RoPE2DBase(PositionalEncoding):
    """Shared machinery: float32 cos/sin tables for the whole sequence in non-persistent
    buffers (checkpoints hold no RoPE tables), rebuilt in float32 if the module is cast."""

    def __init__(self, width: int, num_heads: int, patch_nums: Sequence[int], base: float) -> None:
        super().__init__(width, num_heads, patch_nums)
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
        rope_frequencies(self.head_dim, base)  # validates head_dim % 4
        self.base = float(base)
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)  # (L, d/2) float32
        self.register_buffer("sin", sin, persistent=False)  # (L, d/2) float32

    def positions_xy(self) -> torch.Tensor:
        """(x, y) coordinates of every token of the sequence, float64 ``(L, 2)``."""
        raise NotImplementedError

    def angles(self) -> torch.Tensor:
        """Rotation angle of every token and rotary pair, float64 ``(L, d/2)``."""
        return rope_angles(self.positions_xy(), self.head_dim, self.base)

    def _tables(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        ang = self.angles()  # (L, d/2) float64
        return ang.cos().float().to(device), ang.sin().float().to(device)

    def _apply(self, fn, recurse: bool = True):
        # `.half()` / `.to(torch.bfloat16)` would round the tables: keep them float32
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            cos, sin = self._tables(self.cos.device)
            self.cos, self.sin = cos, sin
        return self

    def rotary(self, positions) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables for ``positions`` (a slice or a LongTensor of token indices).

        Returns:
            ``(cos, sin)``, each float32 ``(l, head_dim // 2)``.
        """
        return self.cos[positions], self.sin[positions]

    def extra_repr(self) -> str:
        return f"width={self.width}, num_heads={self.num_heads}, patch_nums={self.patch_nums}, base={self.base}"


class NormalizedRoPE2D(_RoPE2DBase):
    """STAR's normalized 2D RoPE: every scale spans ``[0, norm]``, corners aligned.

    The token at (row i, col j) of a ``pn x pn`` map is at ``x = j * norm / (pn - 1)``,
    ``y = i * norm / (pn - 1)``; a ``1 x 1`` map is at (0, 0). Used in self-attention only.
    Released STAR configs: ``norm=64, base=10000`` (its code's defaults: 32 / 100).

    Args:
        width: model width C (filled in by the generator).
        num_heads: attention heads (filled in by the generator); ``C / heads`` must be divisible by 4.
        patch_nums: side of each scale's token map (filled in by the generator).
        norm: the coordinate span N of every scale.
        base: frequency base; per-axis frequencies are ``base ** (-k / (head_dim / 4))``.
    """

    def __init__(self, width: int, num_heads: int, patch_nums: Sequence[int], norm: float = 64.0,
                 base: float = 10000.0) -> None:
        self.norm = float(norm)
        super().__init__(width, num_heads, patch_nums, base)

    def positions_xy(self) -> torch.Tensor:
        """(x, y) = (j, i) * norm / (pn - 1) of every token (0 for pn = 1), float64 ``(L, 2)``."""
        scale, rows, cols = token_grid(self.patch_nums)  # each (L,)
        pn = torch.tensor(self.patch_nums, dtype=torch.float64)[scale]  # (L,)
        denom = (pn - 1).clamp(min=1)
        return torch.stack([cols.double() * self.norm / denom, rows.double() * self.norm / denom], dim=-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm={self.norm}"


class RoPE2D(_RoPE2DBase):
    """Plain axial 2D RoPE on token indices: the token at (row i, col j) is at ``x = j, y = i``
    whatever its scale (so scales are start-aligned, not corner-aligned).

    Args:
        width: model width C (filled in by the generator).
        num_heads: attention heads (filled in by the generator); ``C / heads`` must be divisible by 4.
        patch_nums: side of each scale's token map (filled in by the generator).
        base: frequency base; per-axis frequencies are ``base ** (-k / (head_dim / 4))``.
    """

    def __init__(self, width: int, num_heads: int, patch_nums: Sequence[int], base: float = 100.0) -> None:
        super().__init__(width, num_heads, patch_nums, base)

    def positions_xy(self) -> torch.Tensor:
        """(x, y) = (j, i) of every token, float64 ``(L, 2)``."""
        _, rows, cols = token_grid(self.patch_nums)  # each (L,)
        return torch.stack([cols.double(), rows.double()], dim=-1)
