"""The KV cache of sampling: each block's keys and values of all scales so far, preallocated for the whole
sequence, appended scale by scale, read by the attention as views (no mask needed: every cached position is
visible to the current scale).

The appends copy whole token rows; :func:`copy_wide` moves them 16 bytes per element (PyTorch's CUDA copy of
non-contiguous tensors moves one element per access).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


#: the layout of new KV caches' storage: token-major ``(B, L, H, d)`` (True) or head-major ``(B, H, L, d)``
KV_TOKEN_MAJOR = True


#: the wide element types of :func:`copy_wide`, widest first, with their sizes in bytes
_WIDE_TYPES = ((torch.complex128, 16), (torch.int64, 8))


def _wide_ratio(t: torch.Tensor, size: int) -> int:
    """How many of ``t``'s elements one ``size``-byte element holds if ``t`` can be viewed that way along its last
    dim (contiguous, and every size, stride and the offset a multiple), else 0."""
    ratio = size // t.element_size()
    if t.stride(-1) != 1 or t.shape[-1] % ratio or t.storage_offset() % ratio \
            or any(st % ratio for st in t.stride()[:-1]):
        return 0
    return ratio


#: device types on which :func:`copy_wide` uses the wide views (tests add "cpu")
WIDE_COPY_DEVICES = ("cuda",)


def wide_copy_type(dst: torch.Tensor, src: torch.Tensor) -> Optional[torch.dtype]:
    """The widest element type through which :func:`copy_wide` copies ``src`` into ``dst``, or None for the plain
    copy (another device, different dtypes or shapes, elements of 8 bytes already, rows that do not divide)."""
    if (dst.device.type not in WIDE_COPY_DEVICES or dst.dtype != src.dtype or dst.shape != src.shape
            or not dst.dim() or dst.element_size() >= 8):
        return None
    for wide, size in _WIDE_TYPES:
        if _wide_ratio(dst, size) and _wide_ratio(src, size):
            return wide
    return None


def copy_wide(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for same-dtype tensors whose rows are contiguous but the tensors are not (the KV-cache
    appends: a slice of the cache from a view of the qkv product), copied 16 or 8 bytes per element instead of
    2: PyTorch's CUDA copy kernel for non-contiguous tensors moves one element per access. The plain copy where
    no wide view exists, and on the CPU (:data:`WIDE_COPY_DEVICES`)."""
    wide = wide_copy_type(dst, src)
    if wide is None:
        dst.copy_(src)
    else:
        dst.view(wide).copy_(src.view(wide))


class KVCache:
    """Preallocated keys and values of one self-attention layer, ``(B, H, L, d)`` each.

    Stored token-major, ``(B, L, H, d)`` in memory (``token_major``, default :data:`KV_TOKEN_MAJOR`): keys
    and values come out of the QKV projection in that order (the compiled regions keep it for the keys), so
    :meth:`append` is a copy of whole token rows instead of a transposing copy, and the attention kernels
    read either layout.

    Args:
        batch: rows B (twice the images with guidance).
        heads: attention heads H.
        length: L, the tokens of all scales.
        head_dim: d, channels per head.
        device: where the cache lives.
        dtype: the cache's dtype (the attention's).
        token_major: memory layout ``(B, L, H, d)`` (True) or ``(B, H, L, d)`` (None: :data:`KV_TOKEN_MAJOR`).
    """

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, device, dtype,
                 token_major: Optional[bool] = None) -> None:
        token_major = KV_TOKEN_MAJOR if token_major is None else token_major
        if token_major:
            self.k = torch.empty(batch, length, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
        else:
            self.k = torch.empty(batch, heads, length, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)  # (same strides)
        self.length = 0  # number of valid positions

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` ``(B, H, l, d)`` after the valid positions; returns all valid keys and values."""
        start, self.length = self.length, self.length + k.shape[2]
        copy_wide(self.k[:, :, start:self.length], k)
        copy_wide(self.v[:, :, start:self.length], v)
        return self.valid()

    def valid(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The valid keys and values ``(B, H, length, d)`` (views)."""
        return self.k[:, :, :self.length], self.v[:, :, :self.length]
