"""A Triton matrix product for a few rows (``x @ W.T + b`` with ``x`` of 1-64 rows), for the floor of the small
scales' linear layers in ``bench_small_scales.py --splits triton`` (not used by starkit itself).

At 2-50 rows a linear layer only reads its weight: cuBLAS tiles the output columns alone and reads the weights
at ~2 TB/s (the ninth comparison in docs/performance.md). Here each program owns ``BLOCK_N`` output columns for
all rows (padded to 16 for the tensor cores) and streams its ``(BLOCK_N, K)`` slice of the weight once, in
``BLOCK_K`` steps; the launch configuration is tuned per shape (``triton.autotune``: more, thinner programs for
narrow layers). Float32 accumulation, bias added, output in ``x``'s dtype. On a CPU it runs under Triton's
interpreter (``TRITON_INTERPRET=1``), for the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n, k, w, s in ((16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 128, 4, 5), (64, 128, 4, 4),
                              (16, 128, 2, 6), (64, 256, 8, 3))]


@triton.jit
def _few_rows_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, M_PAD)  # (M_PAD,)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                    other=0.0)  # (M_PAD, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K),
                    other=0.0)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` ``(M, K)`` with M <= 64, ``weight`` ``(N, K)`` contiguous."""
    M, K = x.shape
    N = weight.shape[0]
    if M > 64 or weight.shape[1] != K:
        raise ValueError(f"few_rows_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} (at most 64 rows)")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    m_pad = max(16, triton.next_power_of_2(M))
    args = (x, weight, bias if bias is not None else weight, y, M, N, K)
    if x.device.type == "cpu":  # Triton's interpreter: one configuration (autotuning needs a GPU)
        _few_rows_kernel[(triton.cdiv(N, 16),)](*args, M_PAD=m_pad, HAS_BIAS=bias is not None, BLOCK_N=16, BLOCK_K=128)
    else:
        _tuned_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, M_PAD=m_pad, HAS_BIAS=bias is not None)
    return y


_tuned_kernel = triton.autotune(configs=CONFIGS, key=["M_PAD", "N", "K"])(_few_rows_kernel)
