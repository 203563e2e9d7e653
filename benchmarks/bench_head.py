"""The stable sampler head's compiled blocks at one scale of d30 @1024 (``StableSampler(compile_head=True)``):
ms per reveal step with all rows and with the last block on two thirds of them, compiled with dynamic shapes
(as generation does) and with static shapes, and the kernels of one step of each.

    python benchmarks/bench_head.py --json $OUT/head.json                  # GPU (~2 min with compiles)
    TORCH_LOGS=output_code python benchmarks/bench_head.py 2> $OUT/code.txt  # also Inductor's kernels
    python benchmarks/bench_head.py --tiny                                 # CPU smoke test

The head (width 1920, 30 heads, 3 blocks, random weights) runs under bf16 autocast on random generator
states of the scale (batch x 2 rows: guidance), through :meth:`SamplerHead.for_scale` as the sampler calls it.
Static shapes: :func:`starkit.utils.compiling.compile_once` replaced by a ``dynamic=False`` compile for the run.
The markdown table is printed last.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from starkit.samplers.head import SamplerHead  # noqa: E402
from starkit.utils import compiling  # noqa: E402

from bench_decoder import print_kernel_table, timed, top_kernels  # noqa: E402
from bench_generator import device_name, write_results  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small head on the CPU (smoke test)")
    ap.add_argument("--side", type=int, default=64, help="the scale's side (64: 4096 tokens)")
    ap.add_argument("--batch", type=int, default=1, help="images (rows: twice that, guidance)")
    ap.add_argument("--modes", default="dynamic,static")
    ap.add_argument("--kernel-rows", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        width, heads, text_dim, latent, vocab, scales, args.side = 32, 2, 16, 8, 16, 4, 4
        args.warmup, args.repeats = 1, 2
    else:
        width, heads, text_dim, latent, vocab, scales = 1920, 30, 1024, 32, 4096, 14
    torch.manual_seed(0)
    head = SamplerHead(width, text_dim, latent, vocab, heads, scales).to(dev).eval()
    R, l, half = 2 * args.batch, args.side ** 2, width // heads // 2
    dtype = torch.bfloat16 if cuda else torch.float32
    hidden = torch.randn(R, l, width, device=dev, dtype=dtype)
    pooled = torch.randn(R, text_dim, device=dev)
    angles = torch.rand(1 + l, half, device=dev) * 6.28
    rot_first, rot = (angles[:1].cos(), angles[:1].sin()), (angles[1:].cos(), angles[1:].sin())
    revealed = torch.randn(args.batch, l, latent, device=dev)
    some = torch.stack([torch.randperm(l, device=dev)[: 2 * l // 3].sort().values for _ in range(args.batch)])
    amp = torch.autocast(dev.type, torch.bfloat16, enabled=cuda)
    rows, kernels = [], {}
    real_compile_once = compiling.compile_once
    for mode in [m for m in args.modes.split(",") if m]:
        torch._dynamo.reset()
        if mode == "static":
            static = {}
            compiling.compile_once = lambda fn, **kw: static.setdefault(fn, torch.compile(
                fn, backend=compiling.BACKEND, **{**kw, "dynamic": False}))
        try:
            with torch.inference_mode(), amp:
                t0 = time.perf_counter()
                predict = head.for_scale(hidden, pooled, scales - 1, rot_first, rot, compiled=True,
                                         largest_tokens=l)
                for positions in (None, some):
                    predict(revealed, positions)
                first = time.perf_counter() - t0
                for label, positions in (("all rows", None), ("2/3 of the rows", some)):
                    t = timed(lambda: predict(revealed, positions), args.warmup, args.repeats, dev)
                    rows.append(dict(mode=mode, rows=label, ms=t * 1e3, compile_s=first))
                    print(f"[bench_head] {rows[-1]}", flush=True)
                    if cuda and positions is None:
                        kernels[mode] = top_kernels(lambda: predict(revealed, positions), args.kernel_rows)
        finally:
            compiling.compile_once = real_compile_once
    name = device_name(dev)
    if args.json:
        write_results(args.json, name, args, rows, kernels={k: [list(r) for r in v] for k, v in kernels.items()})
    for mode, table in kernels.items():
        print_kernel_table(f"kernels of one step with all rows, {mode} shapes", table)
    print(f"\n## Sampler head, {args.side}x{args.side} scale, batch {args.batch} ({R} rows) ({name}, torch {torch.__version__})\n")
    print("| shapes | rows | ms per reveal step | first calls (s, compiles) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['rows']} | {r['ms']:.3f} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
