"""The positional-encoding interface.

A positional encoding knows every token's place in the scale pyramid: token ``i`` of a
sequence over ``patch_nums`` is at (row, col) of scale k. It may add an absolute
embedding to the inputs (:meth:`absolute`) and/or give rotary tables for self-attention
(:meth:`rotary`). The level (scale) embedding is the generator's, not the encoding's.

Generators build their encoding through a factory ``(width, num_heads, patch_nums) ->
PositionalEncoding``: in YAML the class is named with ``class_path`` and the three values
are filled in by the generator.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn


def token_grid(patch_nums: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale index, row and column of every token, each ``(L,)`` (row-major per scale)."""
    scale, rows, cols = [], [], []
    for k, pn in enumerate(patch_nums):
        r, c = torch.meshgrid(torch.arange(pn), torch.arange(pn), indexing="ij")
        scale.append(torch.full((pn * pn,), k))
        rows.append(r.flatten())
        cols.append(c.flatten())
    return torch.cat(scale), torch.cat(rows), torch.cat(cols)


class PositionalEncoding(nn.Module):
    """Base class. ``positions`` arguments select tokens of the full sequence: a slice
    (a scale during cached sampling) or a LongTensor of indices (token dropping).

    Args:
        width: model width C (filled in by the generator).
        num_heads: attention heads (filled in by the generator); head dim = ``width // num_heads``.
        patch_nums: side of each scale's token map (filled in by the generator); the sequence has
            ``sum(pn**2)`` tokens.
    """

    def __init__(self, width: int, num_heads: int, patch_nums: Sequence[int]) -> None:
        super().__init__()
        self.width, self.num_heads = int(width), int(num_heads)
        self.head_dim = self.width // self.num_heads
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.seq_len = sum(p * p for p in self.patch_nums)

    def absolute(self, positions) -> Optional[torch.Tensor]:
        """Embedding added to the inputs at ``positions``: ``(1, l, width)``, or None."""
        return None

    def rotary(self, positions) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Rotary (cos, sin) tables for ``positions``, each ``(l, head_dim // 2)``, or None."""
        return None

    def resize_state_dict(self, state_dict: dict, prefix: str, old_patch_nums: Sequence[int]) -> None:
        """Adapt this encoding's entries of a state dict saved with ``old_patch_nums`` in place
        (progressive resolution). Encodings without weights have nothing to do."""
