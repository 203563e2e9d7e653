"""VAR's learned absolute position embedding (one learned vector per token of the pyramid)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import PositionalEncoding


def _nearest_scale(pn: int, old_patch_nums: Sequence[int], index: int) -> int:
    """Index of the old scale to take scale ``index`` (side ``pn``) from: the same index when its
    side is unchanged, else an old scale of the same side, else the one whose side is nearest."""
    if index < len(old_patch_nums) and old_patch_nums[index] == pn:
        return index
    # nearest side; on a tie the larger source (downsampling loses less than upsampling)
    return min(range(len(old_patch_nums)), key=lambda k: (abs(old_patch_nums[k] - pn), -old_patch_nums[k]))


class LearnedAbsolutePE(PositionalEncoding):
    """Learned absolute position embedding, as in VAR: a ``(1, L, width)`` parameter
    ``pos_1LC`` added to the inputs (L = sum of pn**2). No rotary tables.

    When ``patch_nums`` change (progressive resolution), :meth:`resize_state_dict` resizes
    each scale's ``pn x pn`` grid by bicubic interpolation.

    Args:
        width: model width C (filled in by the generator).
        num_heads: attention heads (filled in by the generator; unused here).
        patch_nums: side of each scale's token map (filled in by the generator).
        init_std: std of the truncated-normal init; default ``sqrt(1 / (3 * width))`` (VAR's).
    """

    def __init__(self, width: int, num_heads: int, patch_nums: Sequence[int], init_std: Optional[float] = None) -> None:
        super().__init__(width, num_heads, patch_nums)
        self.init_std = math.sqrt(1.0 / (3.0 * self.width)) if init_std is None else float(init_std)
        self.pos_1LC = nn.Parameter(torch.empty(1, self.seq_len, self.width))  # (1, L, C)
        nn.init.trunc_normal_(self.pos_1LC, mean=0.0, std=self.init_std)

    def absolute(self, positions) -> torch.Tensor:
        """Embedding rows at ``positions`` (a slice or a LongTensor of token indices): ``(1, l, width)``."""
        return self.pos_1LC[:, positions]

    @staticmethod
    def _split(pos_1LC: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.Tensor]:
        """Per-scale grids ``(1, C, pn, pn)`` of a ``(1, L, C)`` embedding."""
        grids, start = [], 0
        for pn in patch_nums:
            block = pos_1LC[:, start:start + pn * pn]  # (1, pn*pn, C)
            grids.append(block.transpose(1, 2).unflatten(2, (pn, pn)))  # (1, C, pn, pn)
            start += pn * pn
        return grids

    def resize_state_dict(self, state_dict: dict, prefix: str, old_patch_nums: Sequence[int]) -> None:
        """Resize ``{prefix}pos_1LC`` saved with ``old_patch_nums`` to this encoding's ``patch_nums``.

        A scale whose side is unchanged is copied as is; a scale of a new side is the bicubic
        resize of the old scale of nearest side (extra scales included). Works in place.

        Args:
            state_dict: the state dict to adapt.
            prefix: the key prefix of this module in ``state_dict`` (e.g. ``"pos_enc."``).
            old_patch_nums: the patch_nums the state dict was saved with.
        """
        key = prefix + "pos_1LC"
        if key not in state_dict:
            return
        old = state_dict[key]  # (1, L_old, C)
        old_patch_nums = [int(p) for p in old_patch_nums]
        old_len = sum(p * p for p in old_patch_nums)
        if old.shape[1] != old_len:
            raise ValueError(f"{key} has {old.shape[1]} positions but old_patch_nums {tuple(old_patch_nums)} "
                             f"give {old_len}.")
        if old.shape[2] != self.width:
            raise ValueError(f"{key} has width {old.shape[2]}, this encoding {self.width}: widths cannot be resized.")
        grids = self._split(old.float(), old_patch_nums)  # each (1, C, pn, pn)
        blocks = []
        for k, pn in enumerate(self.patch_nums):
            src = grids[_nearest_scale(pn, old_patch_nums, k)]  # (1, C, pn_old, pn_old)
            if src.shape[-1] != pn:
                src = F.interpolate(src, size=(pn, pn), mode="bicubic", align_corners=False)  # (1, C, pn, pn)
            blocks.append(src.flatten(2).transpose(1, 2))  # (1, pn*pn, C)
        state_dict[key] = torch.cat(blocks, dim=1).to(old.dtype)  # (1, L_new, C)

    def extra_repr(self) -> str:
        return f"width={self.width}, patch_nums={self.patch_nums}, init_std={self.init_std:.4g}"
