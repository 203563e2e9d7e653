"""Losses shared by the generator and the sampler head."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy: logits ``(B, L, V)``, targets ``(B, L)`` -> losses ``(B, L)``.

    The same values as ``F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")``, computed
    over the last (contiguous) dimension: the transposed form sends log-softmax and its backward down a
    strided path; this form made the d16 @256 batch-64 training step 8.9 ms shorter on an H200
    (docs/performance.md).
    """
    B, L, V = logits.shape
    return F.cross_entropy(logits.reshape(B * L, V), targets.reshape(B * L), reduction="none").view(B, L)
