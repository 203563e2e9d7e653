"""Triton kernel of :func:`starkit.generator.fp8.gelu_quantize_rows` (CUDA only; ``AVAILABLE`` is False
without Triton, and the caller then uses PyTorch's operations).

``torch.ops.starkit.gelu_quantize_rows(x)``: ``x`` ``(M, K)`` (bf16 or float32, rows contiguous) ->
``GELU_tanh(x)`` quantized row by row to e4m3 ``(M, K)`` and the float32 row scales ``(M, 1)``, with each
row read once: one program per row holds the whole row (K <= 16384). Registered with
``torch.library.triton_op`` so that compiled regions call it as it is.
"""
from __future__ import annotations

from typing import Tuple

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installation
    AVAILABLE = False

MAX_COLUMNS = 16384

if AVAILABLE:
    @triton.jit
    def _gelu_quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, x_row_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < K
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) (x + 0.044715 x^3)
        g = 0.5 * x * (2.0 * tl.sigmoid(2.0 * inner))  # 0.5 x (1 + tanh(inner)); 1 + tanh(y) = 2 sigmoid(2y)
        scale = tl.maximum(tl.max(tl.abs(g), axis=0), 1e-12) / 448.0  # fp8.E4M3_MAX (a literal in Triton code)
        tl.store(q_ptr + row * K + cols, (g / scale).to(tl.float8e4nv), mask=inside)
        tl.store(scale_ptr + row, scale)

    @triton_op("starkit::gelu_quantize_rows", mutates_args=())
    def gelu_quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        M, K = x.shape
        if K > MAX_COLUMNS or x.stride(1) != 1:
            raise ValueError(f"gelu_quantize_rows takes rows of at most {MAX_COLUMNS} contiguous columns, got "
                             f"{tuple(x.shape)} with strides {x.stride()}.")
        q = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn)
        scale = torch.empty((M, 1), device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(K)
        wrap_triton(_gelu_quantize_rows_kernel)[(M,)](x, q, scale, K, x.stride(0), BLOCK=block,
                                                      num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
        return q, scale
