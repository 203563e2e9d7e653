"""Would FP8 matrix products bring d30 @1024 generation to issue 7's targets? The linear layers of the
d30 transformer and sampler head at the token counts of the last scales, timed in bf16 and as FP8
(e4m3, one scale per row of the activations and per output channel of the weights,
``torch._scaled_mm``), with and without the activations' quantization, and the error against bf16.

    python benchmarks/bench_fp8.py --json $OUT/fp8.json      # H200 (sm90), ~1 min
    python benchmarks/bench_fp8.py --tiny                    # CPU smoke run (small shapes)

The quantization is the library's (:mod:`starkit.generator.fp8`, ``generate(fp8=True)``); "with quantizing x"
times it as a pass of its own, as eager code runs it (the compiled regions fuse it with the LayerNorm or
residual before the product). End-to-end figures: ``bench_generate.py --fp8``.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_generator import device_name, kernel_bench_device, kernel_bench_parser, write_results  # noqa: E402
from bench_tokenizer import timed  # noqa: E402  (CUDA-event median of a call)

sys.path.insert(0, os.path.dirname(HERE))
from starkit.generator.fp8 import quantize_rows, quantize_weight  # noqa: E402

WIDTH, FFN, VOCAB = 1920, 7680, 4096  # d30
LAYERS = {"qkv": (WIDTH, 3 * WIDTH), "proj": (WIDTH, WIDTH), "fc1": (WIDTH, FFN), "fc2": (FFN, WIDTH),
          "logits": (WIDTH, VOCAB)}


def fp8_linear(x_q, x_scale, w_q, w_scale, bias):
    """``x @ w.T + bias`` from e4m3 operands: x_q ``(M, K)``, w_q ``(N, K)``, scales ``(M, 1)``, ``(1, N)``."""
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=torch.bfloat16)


def run(tiny: bool, dev: torch.device, warmup: int, repeats: int) -> list:
    rows = []
    tokens = {"b1 64x64 (2 rows)": 2 * 4097, "b16 64x64 (32 rows)": 32 * 4097} if not tiny else {"tiny": 64}
    layers = LAYERS if not tiny else {"tiny": (64, 96)}
    g = torch.Generator(device=dev).manual_seed(0)
    for tname, M in tokens.items():
        for lname, (K, N) in layers.items():
            x = torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16)
            w = (torch.randn(N, K, device=dev, generator=g) * K ** -0.5).to(torch.bfloat16)
            bias = (torch.randn(N, device=dev, generator=g) * 0.1).to(torch.bfloat16)  # nonzero: a lost bias shows
            w_q, w_scale = quantize_weight(w)  # per output channel: (N, K), (1, N)
            x_q, x_scale = quantize_rows(x)
            ref = F.linear(x, w, bias)
            out = fp8_linear(x_q, x_scale, w_q, w_scale, bias)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            t_bf16 = timed(lambda: F.linear(x, w, bias), warmup, repeats, dev)
            t_fp8 = timed(lambda: fp8_linear(x_q, x_scale, w_q, w_scale, bias), warmup, repeats, dev)
            t_fp8_q = timed(lambda: fp8_linear(*quantize_rows(x), w_q, w_scale, bias), warmup, repeats, dev)
            flops = 2 * M * K * N
            rows.append({"tokens": tname, "layer": lname, "M": M, "K": K, "N": N, "bf16_ms": t_bf16 * 1e3,
                         "fp8_ms": t_fp8 * 1e3, "fp8_with_quant_ms": t_fp8_q * 1e3,
                         "bf16_tflops": flops / t_bf16 / 1e12, "fp8_tflops": flops / t_fp8 / 1e12,
                         "speedup": t_bf16 / t_fp8, "speedup_with_quant": t_bf16 / t_fp8_q, "rel_error": err})
    return rows


def main(argv=None) -> None:
    args = kernel_bench_parser(__doc__, repeats=20).parse_args(argv)
    dev = kernel_bench_device(args)
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
        raise SystemExit(f"bench_fp8.py needs FP8 matrix products (compute capability 8.9+: Ada, Hopper or later); "
                         f"{device_name(dev)} has {torch.cuda.get_device_capability(dev)}.")
    rows = run(args.tiny, dev, args.warmup, args.repeats)
    name = device_name(dev)
    if args.json:
        write_results(args.json, name, args, rows)
    print(f"\n### FP8 against bf16 linear layers ({name}, torch {torch.__version__}; bias in the kernel)\n")
    print("| tokens | layer | M x K x N | bf16 ms (TFLOP/s) | fp8 ms (TFLOP/s) | speed-up | with quantizing x | rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['layer']} | {r['M']} x {r['K']} x {r['N']} | {r['bf16_ms']:.3f} "
              f"({r['bf16_tflops']:.0f}) | {r['fp8_ms']:.3f} ({r['fp8_tflops']:.0f}) | {r['speedup']:.2f}x | "
              f"{r['speedup_with_quant']:.2f}x | {r['rel_error']:.3f} |")


if __name__ == "__main__":
    main()
