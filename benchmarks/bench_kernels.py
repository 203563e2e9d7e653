"""Kernel-level changes of d30 @1024 generation, each against what it replaced, at the real shapes:

* the FFN's first layer: ``F.linear`` then tanh GELU (two kernels; the GELU a full pass over ``(M, 4C)``)
  against :func:`starkit.generator.blocks.fc1_gelu` (GELU in cuBLASLt's epilogue);
* the VQ decoder's last conv (160 -> 3 channels at 1024 px, channels_last bf16): cuDNN's conv against
  :func:`starkit.tokenizers.cnn.tap_conv3x3` (one matrix product to the 9 taps, then a shifted sum), eager and
  compiled (the decoder runs compiled). (Zero-padding the filters to 8 outputs was tried first: 24.5 ->
  24.8 ms at batch 4, no gain; H200, 2026-11-29.)
* the KV-cache appends: ``copy_`` into a slice of the cache against
  :func:`starkit.generator.kv_cache.copy_wide` (the same bytes moved 16 per element), in CUDA graphs.

    python benchmarks/bench_kernels.py --json $OUT/kernels.json     # H200, ~30 s
    python benchmarks/bench_kernels.py --tiny                       # CPU smoke run (small shapes)

``--small-rows`` adds fc1 + GELU at the small scales' row counts (2 to 512 rows, d16 and d30 widths) inside
CUDA graphs, the question left by d16 @256 batch 1 in the sixth comparison (docs/performance.md).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_generator import device_name, kernel_bench_device, kernel_bench_parser, write_results  # noqa: E402
from bench_tokenizer import timed  # noqa: E402  (CUDA-event median of a call)

from starkit.generator.blocks import fc1_gelu  # noqa: E402
from starkit.tokenizers.cnn import tap_conv3x3  # noqa: E402


def run(tiny: bool, dev: torch.device, warmup: int, repeats: int) -> list:
    rows, dt = [], torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    C = 64 if tiny else 1920
    for name, M in ({"tiny": 64} if tiny else {"b1, 64x64 scale (2 rows)": 2 * 4097,
                                               "b16, 64x64 scale (32 rows)": 32 * 4097}).items():
        h = torch.randn(1, M, C, device=dev, generator=g).to(dt)
        w = (torch.randn(4 * C, C, device=dev, generator=g) * C ** -0.5).to(dt)
        b = torch.randn(4 * C, device=dev, generator=g).to(dt)
        before = timed(lambda: F.gelu(F.linear(h, w, b), approximate="tanh"), warmup, repeats, dev)
        after = timed(lambda: fc1_gelu(h, w, b), warmup, repeats, dev)
        rows.append({"case": f"fc1 + GELU, {name}", "before": "linear, then GELU", "after": "fc1_gelu (epilogue)",
                     "before_ms": before * 1e3, "after_ms": after * 1e3, "speedup": before / after,
                     "tflops_after": 2 * M * C * 4 * C / after / 1e12})
    channels, side = (16, 64) if tiny else (160, 1024)
    for batch in (1, 4):
        x = torch.randn(batch, channels, side, side, device=dev, generator=g).to(dt)
        x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(3, channels, 3, 3, device=dev, generator=g) * 0.05).to(dt)
        w = w.contiguous(memory_format=torch.channels_last)
        bias = torch.zeros(3, device=dev, dtype=dt)
        want = F.conv2d(x, w, bias, 1, 1)
        before = timed(lambda: F.conv2d(x, w, bias, 1, 1), warmup, repeats, dev)
        compiled = torch.compile(tap_conv3x3, dynamic=False) if dev.type == "cuda" else tap_conv3x3
        for label, fn in (("tap_conv3x3, eager", tap_conv3x3), ("tap_conv3x3, compiled", compiled)):
            err = float((want.float() - fn(x, w, bias).float()).abs().max())
            after = timed(lambda: fn(x, w, bias), warmup, repeats, dev)
            rows.append({"case": f"decoder conv_out {channels}->3 at {side} px, batch {batch}", "before": "conv2d",
                         "after": label, "before_ms": before * 1e3, "after_ms": after * 1e3,
                         "speedup": before / after, "max_abs_diff": err})
    return rows


def graphed(fn, dev: torch.device, calls: int = 20):
    """A callable replaying ``calls`` calls of ``fn`` from one CUDA graph (kernel time without launch overhead,
    as generation's graphs run them), and the divisor to get one call's time; on the CPU ``fn`` itself."""
    if dev.type != "cuda":
        return fn, 1
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay, calls


def small_rows(tiny: bool, dev: torch.device, warmup: int, repeats: int) -> list:
    """fc1 + GELU at the small scales' row counts (batch 1 with guidance: 2 x tokens), d16 and d30 widths,
    inside CUDA graphs: the epilogue form against linear + GELU where the row count is small."""
    rows, dt = [], torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    for label, C in (("d16", 64 if tiny else 1024), ("d30", 64 if tiny else 1920)):
        w = (torch.randn(4 * C, C, device=dev, generator=g) * C ** -0.5).to(dt)
        b = torch.randn(4 * C, device=dev, generator=g).to(dt)
        for M in (2, 8, 32, 128, 512):
            h = torch.randn(1, M, C, device=dev, generator=g).to(dt)
            times = []
            for fn in (lambda: F.gelu(F.linear(h, w, b), approximate="tanh"), lambda: fc1_gelu(h, w, b)):
                replay, calls = graphed(fn, dev)
                times.append(timed(replay, warmup, repeats, dev) / calls)
            rows.append({"case": f"fc1 + GELU, {label} width {C}, {M} rows, in a CUDA graph",
                         "before": "linear, then GELU", "after": "fc1_gelu (epilogue)", "before_ms": times[0] * 1e3,
                         "after_ms": times[1] * 1e3, "speedup": times[0] / times[1],
                         "tflops_after": 2 * M * C * 4 * C / times[1] / 1e12})
    return rows


def kv_appends(tiny: bool, dev: torch.device, warmup: int, repeats: int) -> list:
    """The KV-cache append of one block (keys and values into the token-major cache, from the qkv product's
    views) at d30 @1024's 21x21 and 64x64 scales, batch 1 and 16 with guidance, in a CUDA graph: ``copy_``
    against :func:`starkit.generator.kv_cache.copy_wide` (16-byte elements). The copies must be bitwise equal."""
    from starkit.generator.kv_cache import copy_wide
    rows, dt = [], torch.bfloat16
    H, d, total = (2, 32, 40) if tiny else (30, 64, 9451)
    for batch in (1, 16):
        R = 2 * batch
        for side, start in ((3, 14), (4, 23)) if tiny else ((21, 585), (64, 5355)):
            l = side * side  # start: the tokens of the scales before it
            qkv = torch.randint(-2 ** 15, 2 ** 15, (R, l, 3, H, d), dtype=torch.int16, device=dev).view(dt)
            _, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (R, H, l, d) views, rows 3 H d apart
            k = k.transpose(1, 2).contiguous().transpose(1, 2)  # token-major, as the compiled region gives keys
            caches = [torch.zeros(R, total, H, d, dtype=dt, device=dev).transpose(1, 2) for _ in range(4)]
            plain = lambda: (caches[0][:, :, start:start + l].copy_(k), caches[1][:, :, start:start + l].copy_(v))
            wide = lambda: (copy_wide(caches[2][:, :, start:start + l], k), copy_wide(caches[3][:, :, start:start + l], v))
            times = []
            for fn in (plain, wide):
                replay, calls = graphed(fn, dev)
                times.append(timed(replay, warmup, repeats, dev) / calls)
            equal = torch.equal(caches[0].view(torch.int16), caches[2].view(torch.int16)) and torch.equal(
                caches[1].view(torch.int16), caches[3].view(torch.int16))
            rows.append({"case": f"KV append (keys + values), {side}x{side} scale, batch {batch} ({R} rows)",
                         "before": "copy_", "after": "copy_wide", "before_ms": times[0] * 1e3,
                         "after_ms": times[1] * 1e3, "speedup": times[0] / times[1],
                         "max_abs_diff": 0.0 if equal else float("nan")})
    return rows


def main(argv=None) -> None:
    ap = kernel_bench_parser(__doc__, repeats=20)
    ap.add_argument("--small-rows", action="store_true",
                    help="also fc1 + GELU at the small scales' row counts (2-512 rows, d16 and d30 widths) inside "
                         "CUDA graphs")
    args = ap.parse_args(argv)
    dev = kernel_bench_device(args)
    with torch.no_grad():
        rows = run(args.tiny, dev, args.warmup, args.repeats) + kv_appends(args.tiny, dev, args.warmup, args.repeats)
        if args.small_rows:
            rows += small_rows(args.tiny, dev, args.warmup, args.repeats)
    name = device_name(dev)
    if args.json:
        write_results(args.json, name, args, rows)
    print(f"\n### Kernel changes of d30 @1024 generation ({name}, torch {torch.__version__})\n")
    print("| case | before | after | before ms | after ms | speed-up | note |\n|---|---|---|---|---|---|---|")
    for r in rows:
        note = (f"{r['tflops_after']:.0f} TFLOP/s after" if "tflops_after" in r
                else f"max abs. diff {r['max_abs_diff']:.1e}")
        print(f"| {r['case']} | {r['before']} | {r['after']} | {r['before_ms']:.3f} | {r['after_ms']:.3f} | "
              f"{r['speedup']:.2f}x | {note} |")


if __name__ == "__main__":
    main()
