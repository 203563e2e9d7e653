"""Resizes of the small latent maps of the multi-scale quantizer as matrix products.

On a GPU, aten's bicubic kernel is slow for the quantizer's tiny maps (about 1.6 ms per
``(64, 32, pn, pn) -> (64, 32, 16, 16)`` call on an H200, 18 calls per training step).
Bicubic (``align_corners=False``) and area resampling are linear and separable: a resize
of ``(h, w)`` to ``(H, W)`` is ``A_h @ x @ A_w^T`` with 1-D matrices ``A_h`` (H, h) and
``A_w`` (W, w), i.e. two small matmuls. The matrices are built once per size pair by
``F.interpolate`` of identity basis signals, so their weights are exactly PyTorch's,
border clamping included; the results equal ``F.interpolate``'s up to fp32 rounding (~1e-6).
The quantizer uses it for its bicubic upsampling; its area downsampling stays on aten's
adaptive average pooling, a single kernel that was not slow in the profile (and on the CPU
the matrix form is no faster).
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

MODES = ("bicubic", "area")


@functools.lru_cache(maxsize=None)
def resize_matrix(n_in: int, n_out: int, mode: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 1-D matrix ``(n_out, n_in)`` of ``F.interpolate(mode=mode)`` from ``n_in`` to ``n_out`` samples,
    cached per arguments (:func:`build_resize_matrix` uncached)."""
    return build_resize_matrix(n_in, n_out, mode, device, dtype)


def build_resize_matrix(n_in: int, n_out: int, mode: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`resize_matrix` without the cache (while tracing: fake tensors must not enter the cache)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kwargs = {"align_corners": False} if mode == "bicubic" else {}
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable later with autograd
        basis = torch.eye(n_in, device=device, dtype=dtype).view(n_in, 1, n_in, 1)  # basis i = row i
        cols = F.interpolate(basis, size=(n_out, 1), mode=mode, **kwargs)  # (n_in, 1, n_out, 1)
        return cols.view(n_in, n_out).t().contiguous()  # (n_out, n_in)


def resize(x: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """``F.interpolate(x, size, mode)`` (bicubic with ``align_corners=False``, or area) as two matmuls,
    computed in fp32 (or fp64) with autocast off. ``x`` ``(B, C, h, w)`` -> ``(B, C, H, W)``.

    On a GPU whose float32 matmuls may run in TF32 (``allow_tf32`` or a matmul precision other than
    "highest", as Lightning suggests and VAR's code sets), the products run in float64 instead, so
    the result stays aten's fp32 interpolation up to rounding (TF32 would err by ~1e-3)."""
    (h, w), (H, W) = x.shape[-2:], size
    dtype = torch.promote_types(x.dtype, torch.float32)
    if x.is_cuda and dtype == torch.float32 and (torch.backends.cuda.matmul.allow_tf32
                                                 or torch.get_float32_matmul_precision() != "highest"):
        dtype = torch.float64
    matrix = build_resize_matrix if torch.compiler.is_compiling() or is_fake(x) else resize_matrix
    with torch.autocast(device_type=x.device.type, enabled=False):
        A_h = matrix(h, H, mode, x.device, dtype)  # (H, h)
        A_w = matrix(w, W, mode, x.device, dtype)  # (W, w)
        out = A_h @ (x.to(dtype) @ A_w.t())  # (B, C, h, W) -> (B, C, H, W)
    return out.to(x.dtype)
