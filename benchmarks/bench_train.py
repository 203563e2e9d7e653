"""Training step of starkit's STAR generator, at the largest batch that fits, against the OFFICIAL
STAR-T2I trainer in the same run: the training benchmark of issues 4 and 7 (random weights, real
architectures, no downloads).

    python benchmarks/bench_train.py --official-root .official/STAR --json $OUT/bench_train.json
    python benchmarks/bench_train.py --configs d30@1024 --search 8,12,16,24,32       # only the 1024 batch search
    python benchmarks/bench_train.py --tiny --official-root /path/to/STAR             # CPU smoke run
    python benchmarks/bench_train.py --configs d16@256 --compile off,on --search 64   # compiled blocks too
    ... --profile-dir $OUT/prof      # also the top kernels of two steps of each row (profile_*.txt)
    ... --pretokenized               # starkit trains on token rows (TokenizedDataModule): no VQ encode in the step

Configs: d16@256 and d30@256 (patch_nums 1..16, 680 tokens) and d30@1024 (1..64, 9451 tokens,
651 last-scale tokens dropped as STAR does (9451 -> 8800), activation checkpointing on).
starkit's step is benchmarks/bench_generator.py's ``bench_train``: what Lightning's bf16-mixed +
gradient clipping 2.0 run, written out (VQ encode and CLIP encode inside the step, caption
dropout, fused AdamW), with ``--attentions sdpa,flex`` once per attention implementation (the
dense block-causal mask, FlexAttention). For each config the batches of ``--search`` (or the config's default list)
are timed in increasing order until one runs out of memory; the largest that fits is the row.
The official trainer (benchmarks/official_star_train.py) is timed the same way at its own
batches, so the table gives both at the same batch and each at its largest.
Step time: CUDA events between consecutive step boundaries, median of ``--steps`` after ``--warmup``.
MFU against 789 TFLOP/s (the H200's measured bf16 matmul rate), analytic FLOPs (benchmarks/flops.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_generator as bg  # noqa: E402

PATCH_NUMS = {"d16@256": bg.P256, "d30@256": bg.P256, "d30@1024": bg.P1024}
TINY_PATCH_NUMS = {"d16@256": bg.TINY_P256, "d30@256": bg.TINY_P256, "d30@1024": bg.TINY_P512}
SEARCH = {"d16@256": "32,64,96,128", "d30@256": "16,32,48,64", "d30@1024": "4,8,12,16,24"}
TOKEN_DROP_1024 = 651  # 9451 -> 8800, STAR's cap


def time_ours(config: str, args, dev, text) -> list:
    tiny = args.tiny
    pn = (TINY_PATCH_NUMS if tiny else PATCH_NUMS)[config]
    tok = bg.build_tokenizer(tiny, pn, dev)
    gen = bg.build_generator(config.split("@")[0], tiny, pn, tok, text, dev)
    if config.endswith("1024"):
        gen.hparams.token_drop = 4 if tiny else TOKEN_DROP_1024
        gen.transformer.activation_checkpointing = True
    side = pn[-1] * tok.downsample
    rows = []
    # "off" first: the compiled VQ encoder cannot be undone in place
    modes = [(a, c) for c in sorted(set(args.compile.split(",")), key=("off", "on").index)
             for a in args.attentions.split(",")]
    for attention, compiled in modes:
        gen.transformer.attention = attention
        gen.transformer.compile_blocks = compiled == "on"  # ScaleWiseGenerator(compile=True)
        if compiled == "on":
            gen.compile_tokenizer_encoder()
        if hasattr(text, "compile_model"):  # HFTextEncoder(compile=True) on the compiled rows, if asked
            text.compile_model = args.compile_text and compiled == "on"
        impl = ("starkit" if attention == "sdpa" else f"starkit {attention}") + (" compiled" if compiled == "on" else "")
        impl += " + text" if getattr(text, "compile_model", False) else ""
        impl += " pretokenized" if args.pretokenized else ""

        def one(B: int) -> dict:
            try:
                row = bg.bench_train(gen, config, B, side, args, dev)
            finally:
                for p in gen.parameters():
                    p.grad = None
                bg.free_memory(dev)
            bg.log(f"{impl} {config} b{B}: {row['step_s_median'] * 1000:.1f} ms/step, {row['images_per_s']:.2f} "
                   f"img/s, MFU {row['mfu_pct']}, {row['peak_gib']} GiB")
            return row

        rows += [dict(r, impl=impl, attention=attention, compiled=compiled == "on")
                 for r in bg.search_batches(config, batch_list(config, args), one, dev)]
    del gen, tok
    bg.free_memory(dev)
    return rows


def time_official(config: str, args, dev) -> list:
    from official_star_train import build_official_trainer

    def one(B: int) -> dict:
        trainer = build_official_trainer(args.official_root, config, dev, B, tiny=args.tiny)
        try:
            times, _ = bg.time_steps(trainer.step, args.warmup, args.steps, dev)
        finally:
            peak = bg.peak_gib(dev)
            del trainer
            bg.free_memory(dev)
        t = sorted(times)[len(times) // 2]
        bg.log(f"official {config} b{B}: {t * 1000:.1f} ms/step, {B / t:.2f} img/s, {peak} GiB")
        return {"impl": "official", "config": config, "batch": B, "step_s_median": t, "step_s_all": times,
                "images_per_s": B / t, "peak_gib": peak}

    return [dict(r, impl="official") for r in bg.search_batches(config, batch_list(config, args), one, dev)]


def batch_list(config: str, args) -> list:
    out = [int(b) for b in (args.search or SEARCH[config]).split(",") if b]
    return sorted({min(b, 2) for b in out}) if args.tiny else out


def table(rows: list, device_name: str) -> str:
    lines = [f"### Training step, starkit vs official STAR-T2I ({device_name})", "",
             "| config | impl | batch | ms/step | images/s | tokens/s | MFU % | peak GiB | starkit/official images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    official = {(r["config"], r["batch"]): r for r in rows if r["impl"] == "official" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['impl']} | {r['batch']} | {r['error'][:40]} | | | | | |")
            continue
        o = official.get((r["config"], r["batch"])) if r["impl"].startswith("starkit") else None
        ratio = f"{r['images_per_s'] / o['images_per_s']:.2f}x" if o else ""
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['config']} | {r['impl']} | {r['batch']} | {1000 * r['step_s_median']:.1f} | "
                     f"{r['images_per_s']:.2f} | {fmt(r.get('tokens_per_s'), '.0f')} | {fmt(r.get('mfu_pct'), '.1f')} | "
                     f"{fmt(r.get('peak_gib'), '.1f')} | {ratio} |")
    best = {}
    for r in rows:
        if "error" not in r:
            key = (r["config"], r["impl"])
            best[key] = max(best.get(key, r), r, key=lambda x: x["batch"])
    lines.append("")
    for (config, impl), r in sorted(best.items()):
        lines.append(f"- {config} {impl}: largest batch that fits {r['batch']} ({r['images_per_s']:.2f} images/s)")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="d16@256,d30@256,d30@1024")
    ap.add_argument("--search", default=None, help="increasing batches to try (default: per config)")
    ap.add_argument("--attentions", default="sdpa", help="training attention(s) of starkit: sdpa, flex or sdpa,flex")
    ap.add_argument("--compile", default="off", help="off, on or off,on: ScaleWiseGenerator(compile=True) rows "
                    "('compiled': torch.compile'd blocks in the training pass and VQ encoder); 'on' after 'off'")
    ap.add_argument("--compile-text", action="store_true",
                    help="the compiled rows also compile the CLIP text encoder (HFTextEncoder(compile=True))")
    ap.add_argument("--pretokenized", action="store_true",
                    help="starkit rows train on token rows (starkit.data.TokenizedDataModule): no VQ encode in "
                         "the step (the official rows still encode: their ratio is then not like for like)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True for starkit's rows (what `trainer: benchmark: true` "
                         "sets; the official trainer turns it on itself)")
    ap.add_argument("--profile-dir", default=None, help="write a torch.profiler kernel table of 2 steps per row here")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--official-root", default=None, help="a checkout of STAR-T2I (not committed); none: ours only")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, batch <= 2")
    ap.add_argument("--text", choices=("clip", "random"), default="clip")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
    dev = torch.device(args.device)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    device_name = bg.device_name(dev)
    rows, workdir = [], tempfile.mkdtemp(prefix="bench_train_")
    try:
        text, _ = bg.build_text_encoder(args.text, args.tiny, dev, workdir)
        for config in args.configs.split(","):
            rows += time_ours(config, args, dev, text)
            if args.official_root:
                rows += time_official(config, args, dev)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        bg.write_results(args.json, device_name, args, rows)
    print()
    print(table(rows, device_name + (" (tiny smoke run)" if args.tiny else "")), flush=True)


if __name__ == "__main__":
    main()
