"""The VQ autoencoder's inference rewrites, one at a time: decode (and encode) time at 1024 px, compiled and
channels_last in bf16 as generation runs it, with each rewrite of ``starkit.tokenizers.cnn.INFERENCE_REWRITES``
switched off and all of them on; the output difference against the rewrites off; the top kernels of one decode.

    python benchmarks/bench_decoder.py --json $OUT/decoder.json            # GPU (~3-5 min with compiles)
    python benchmarks/bench_decoder.py --tiny                              # CPU smoke test (seconds)

Variants: ``base`` (only ``tap_conv_out``: the code before ``subpixel_upsample`` and
``channel_stats_group_norm``), ``all`` (every rewrite), ``no_<name>`` (all but one). Each variant is compiled
afresh (``torch._dynamo.reset()``). Timings: median of ``--repeats`` after ``--warmup`` calls, CUDA events.
The markdown table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from starkit.tokenizers import MultiScaleVQ, cnn  # noqa: E402

from bench_generator import device_name, write_results  # noqa: E402
from bench_tokenizer import timed  # noqa: E402

P1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
NEW = ("subpixel_upsample", "channel_stats_group_norm")


def set_variant(name: str) -> None:
    """Switch :data:`cnn.INFERENCE_REWRITES` for the variant ``name`` (see the module docstring)."""
    for key in cnn.INFERENCE_REWRITES:
        cnn.INFERENCE_REWRITES[key] = not (name == "base" and key in NEW or name == f"no_{key}")


def top_kernels(fn, rows: int) -> list:
    """The ``rows`` CUDA kernels of one ``fn()`` call with the most device time: (name, calls, total us)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            calls, us = totals.get(event.name, (0, 0.0))
            totals[event.name] = (calls + 1, us + event.device_time)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])
    return [(name, calls, us) for name, (calls, us) in ranked[:rows]] + [("all kernels", sum(
        c for c, _ in totals.values()), sum(us for _, us in totals.values()))]


def print_kernel_table(title: str, table: list) -> None:
    """A markdown table of :func:`top_kernels` rows under ``title``."""
    print(f"\n{title}:\n\n| kernel | calls | us |\n|---|---|---|")
    for name, calls, us in table:
        print(f"| {name[:100]} | {calls} | {us:.0f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small model on the CPU, eager (smoke test)")
    ap.add_argument("--batches", default="1,4", help="comma list of batch sizes")
    ap.add_argument("--variants", default="base,all,no_subpixel_upsample,no_channel_stats_group_norm")
    ap.add_argument("--encode-variants", default="base,all", help="variants whose encoder is timed too ('' none)")
    ap.add_argument("--profile-variants", default="base,all", help="variants whose kernels are listed (batch 1)")
    ap.add_argument("--kernel-rows", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        arch, pn = dict(ch=32, z_channels=8, codebook_size=64), (1, 2, 4)
        args.warmup, args.repeats = 1, 2
        cnn.REWRITE_DEVICES = ("cpu",)  # the rewrites on the CPU, so that the smoke test runs them
    else:
        arch, pn = dict(ch=160, z_channels=32, codebook_size=4096), P1024
    torch.manual_seed(0)
    tok = MultiScaleVQ(**arch, patch_nums=pn).to(dev).eval()
    if cuda:
        torch.backends.cudnn.benchmark = True
        tok = tok.to(memory_format=torch.channels_last)
    amp = (lambda: torch.autocast("cuda", torch.bfloat16)) if cuda else contextlib.nullcontext
    side = pn[-1]
    batches = [int(b) for b in args.batches.split(",") if b]
    latents = {B: torch.randn(B, arch["z_channels"], side, side, device=dev) for B in batches}
    images = {B: torch.rand(B, 3, side * tok.downsample, side * tok.downsample, device=dev) * 2 - 1 for B in batches}
    with torch.inference_mode():
        set_variant("base")
        reference = {B: tok.decode_latent(latents[B]).float() for B in batches}  # eager, float32, no new rewrites
    rows, kernels, outputs = [], {}, {}
    for variant in [v for v in args.variants.split(",") if v]:
        set_variant(variant)
        torch._dynamo.reset()
        decoder, encoder = tok.decoder, tok.encoder
        if cuda:
            tok.decoder, tok.encoder = torch.compile(decoder), torch.compile(encoder)
        try:
            for B in batches:
                with torch.inference_mode(), amp():
                    t0 = time.perf_counter()
                    out = tok.decode_latent(latents[B]).float()
                    first = time.perf_counter() - t0
                    dec = timed(lambda: tok.decode_latent(latents[B]), args.warmup, args.repeats, dev)
                    enc = None
                    if variant in args.encode_variants.split(","):
                        enc = timed(lambda: tok.encode_latent(images[B]), args.warmup, args.repeats, dev)
                    if cuda and B == batches[0] and variant in args.profile_variants.split(","):
                        kernels[variant] = top_kernels(lambda: tok.decode_latent(latents[B]), args.kernel_rows)
                outputs[(variant, B)] = out
                row = dict(variant=variant, batch=B, decode_ms=dec * 1e3, decode_ms_per_image=dec * 1e3 / B,
                           encode_ms=None if enc is None else enc * 1e3, first_call_s=first,
                           max_diff_fp32=(out - reference[B]).abs().max().item(),
                           mean_diff_fp32=(out - reference[B]).abs().mean().item())
                base = outputs.get(("base", B))
                if base is not None:
                    row["max_diff_base"] = (out - base).abs().max().item()
                    row["mean_diff_base"] = (out - base).abs().mean().item()
                rows.append(row)
                print(f"[bench_decoder] {row}", flush=True)
        finally:
            tok.decoder, tok.encoder = decoder, encoder
    set_variant("all")
    name = device_name(dev)
    if args.json:
        write_results(args.json, name, args, rows, kernels={k: [list(r) for r in v] for k, v in kernels.items()})
    for variant, table in kernels.items():
        print_kernel_table(f"kernels of one batch-{batches[0]} decode, variant {variant}", table)
    base_ms = {r["batch"]: r["decode_ms"] for r in rows if r["variant"] == "base"}
    print(f"\n## VQ decoder rewrites ({name}, torch {torch.__version__}, {'bf16 channels_last compiled' if cuda else 'fp32 eager'})\n")
    print("| variant | batch | decode ms (per image) | vs base | encode ms | max / mean diff vs base | max diff vs fp32 eager |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{base_ms[r['batch']] / r['decode_ms']:.3f}x" if r["batch"] in base_ms else "-"
        enc = "-" if r["encode_ms"] is None else f"{r['encode_ms']:.2f}"
        diff = f"{r['max_diff_base']:.3g} / {r['mean_diff_base']:.3g}" if "max_diff_base" in r else "-"
        print(f"| {r['variant']} | {r['batch']} | {r['decode_ms']:.2f} ({r['decode_ms_per_image']:.2f}) | {ratio} | "
              f"{enc} | {diff} | {r['max_diff_fp32']:.3g} |")


if __name__ == "__main__":
    main()
