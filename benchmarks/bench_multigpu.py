"""Multi-GPU training benchmark of starkit's STAR generator: throughput per GPU on 1 vs N GPUs
(scaling efficiency) and peak memory with DDP vs FSDP, through a real Lightning ``Trainer.fit``.

    python benchmarks/bench_multigpu.py --gpus 8 --out $OUT/bench_multigpu.json   # one command, table last
    python benchmarks/bench_multigpu.py --tiny --gpus 2                           # CPU smoke run (gloo)

Configs (real architectures, random weights; models built by benchmarks/bench_generator.py):
  * d30 @256: patch_nums 1..16 (680 tokens), batch ``--batch-256`` per GPU.
  * d30 @1024: 14 scales to 64x64 (9451 tokens), 651 tokens of the last scale dropped, activation
    checkpointing (the model's own under DDP / single GPU; FSDP's per-Block wrapper under FSDP),
    batch ``--batch-1024`` per GPU.
Runs per config: 1 GPU (``strategy=auto``), N GPUs DDP, N GPUs FSDP (``BlockFSDPStrategy``,
FULL_SHARD, per-Block units). bf16-mixed, gradient clipping 2.0, fused AdamW, synthetic images
(the same batch size per GPU in every run: weak scaling). Each run is a child process
(``--worker``) that Lightning's own launcher spreads over the GPUs; step time = median interval
between consecutive ``on_train_batch_end`` (CUDA events on rank 0) after ``--warmup`` steps;
peak memory = max over ranks of ``torch.cuda.max_memory_allocated``. Scaling efficiency =
(images/s per GPU on N GPUs) / (images/s on 1 GPU). A run that fails (e.g. out of memory) is a
row with its error. The text tower is ``RandomTextEncoder`` (1024-d, 77 tokens) unless
``--text clip`` (SD-2.1-size CLIP with random weights, slower to build on every rank).

On a CPU (``--tiny``): tiny models, gloo, 2 steps; FSDP rows say why they are skipped (torch's
FSDP needs a GPU).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import bench_generator as bg  # noqa: E402  (reuse its builders: real sizes, tiny stand-ins)

CONFIGS = {
    "d30@256": dict(patch_nums=bg.P256, tiny_patch_nums=bg.TINY_P256, side=256, token_drop=0, checkpointing=False),
    "d30@1024": dict(patch_nums=bg.P1024, tiny_patch_nums=bg.TINY_P512, side=1024, token_drop=651, checkpointing=True),
}


# ------------------------------------------------------------------------------------ worker
def worker(args) -> None:
    import lightning as L
    from starkit.generator.distributed import BlockFSDPStrategy

    cfg = CONFIGS[args.config]
    cuda = not args.tiny and torch.cuda.is_available()
    patch_nums = cfg["tiny_patch_nums"] if args.tiny else cfg["patch_nums"]
    side = patch_nums[-1] * (8 if args.tiny else 16)
    token_drop = min(cfg["token_drop"], patch_nums[-1] ** 2 // 4) if args.tiny else cfg["token_drop"]
    batch = args.batch
    workdir = tempfile.mkdtemp(prefix="bench_multigpu_")
    cpu = torch.device("cpu")
    tok = bg.build_tokenizer(args.tiny, patch_nums, cpu)
    text, _ = bg.build_text_encoder(args.text, args.tiny, cpu, workdir)
    gen = bg.build_generator("d30", args.tiny, patch_nums, tok, text, cpu)
    gen.hparams.token_drop = token_drop
    fsdp = args.strategy == "fsdp"
    gen.transformer.activation_checkpointing = cfg["checkpointing"] and not fsdp
    n_params = sum(p.numel() for p in gen.transformer.parameters())

    g = torch.Generator().manual_seed(0)
    pool = torch.rand(4, 3, side, side, generator=g) * 2 - 1

    class Synthetic(torch.utils.data.Dataset):
        def __len__(self):
            return batch * (args.warmup + args.steps + 2)

        def __getitem__(self, i):
            return {"image": pool[i % len(pool)], "caption": bg.CAPTIONS[i % len(bg.CAPTIONS)]}

    if args.strategy == "single":
        strategy, devices = "auto", 1
    elif args.strategy == "ddp":
        strategy, devices = "ddp", args.devices
    else:
        strategy, devices = BlockFSDPStrategy(activation_checkpointing=cfg["checkpointing"]), args.devices
    timer = bg.step_timer(cuda)
    loader = torch.utils.data.DataLoader(Synthetic(), batch_size=batch, num_workers=2 if cuda else 0,
                                         pin_memory=cuda, drop_last=True)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=devices, strategy=strategy,
                        precision="bf16-mixed" if cuda else "32-true", gradient_clip_val=2.0,
                        max_steps=args.warmup + args.steps + 1, use_distributed_sampler=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    row = {"config": args.config, "strategy": args.strategy, "gpus": devices, "batch_per_gpu": batch,
           "params": n_params, "side": side, "token_drop": token_drop}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(gen, train_dataloaders=loader)
        times = timer.step_times(args.warmup)
        t = statistics.median(times)
        row.update(step_s=t, step_s_all=times, images_per_s_per_gpu=batch / t, images_per_s=batch * devices / t)
    except Exception as err:  # noqa: BLE001  (OOM and the like: a row with the error)
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        traceback.print_exc()
    row["peak_gib"] = torch.cuda.max_memory_allocated() / bg.GIB if cuda else None
    rank = trainer.global_rank
    with open(f"{args.out}.rank{rank}.json", "w") as fh:
        json.dump(row, fh)


# ------------------------------------------------------------------------------------ driver
def run_one(args, config: str, strategy: str, devices: int, batch: int, tmp: str) -> dict:
    base = {"config": config, "strategy": strategy, "gpus": devices, "batch_per_gpu": batch}
    if strategy == "fsdp" and (args.tiny or not torch.cuda.is_available()):
        return {**base, "error": "skipped: Lightning's FSDP needs CUDA GPUs"}
    out = os.path.join(tmp, f"{config}-{strategy}-{devices}".replace("@", "_"))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--config", config, "--strategy", strategy,
           "--devices", str(devices), "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--text", args.text, "--out", out] + (["--tiny"] if args.tiny else [])
    bg.log(f"{config} {strategy} x{devices}: {' '.join(cmd[2:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    rows = [json.load(open(p)) for p in sorted(glob.glob(out + ".rank*.json"))]
    if not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**base, "error": f"exit {proc.returncode}: {' | '.join(tail)[:300]}"}
    row = next((r for r in rows if "error" in r), rows[0])
    peaks = [r["peak_gib"] for r in rows if r.get("peak_gib") is not None]
    row["peak_gib"] = max(peaks) if peaks else None
    row["ranks_reported"] = len(rows)
    return row


def fmt_table(rows: list, device: str) -> str:
    single = {r["config"]: r.get("images_per_s_per_gpu") for r in rows if r["strategy"] == "single"}
    lines = [f"### starkit multi-GPU training ({device})", "",
             "| config | strategy | GPUs | batch/GPU | step (s) | img/s per GPU | img/s total | scaling eff. | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['strategy']} | {r['gpus']} | {r['batch_per_gpu']} | "
                         f"{r['error']} | | | | |")
            continue
        base = single.get(r["config"])
        eff = f"{100 * r['images_per_s_per_gpu'] / base:.0f}%" if base else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append(f"| {r['config']} | {r['strategy']} | {r['gpus']} | {r['batch_per_gpu']} | {r['step_s']:.3f} | "
                     f"{r['images_per_s_per_gpu']:.2f} | {r['images_per_s']:.2f} | {eff} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=None, help="N: GPUs of the multi-GPU runs (default: all visible)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, gloo, 2 steps")
    ap.add_argument("--configs", default="d30@256,d30@1024", help="comma-separated: d30@256, d30@1024")
    ap.add_argument("--strategies", default="single,ddp,fsdp", help="comma-separated: single, ddp, fsdp")
    ap.add_argument("--batch-256", type=int, default=32, help="batch per GPU of d30 @256")
    ap.add_argument("--batch-1024", type=int, default=8,
                    help="batch per GPU of d30 @1024 (8 fits in 46 GiB on one H200)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--text", choices=("random", "clip"), default="random")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    # worker (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.batch_256, args.batch_1024 = min(args.batch_256, 2), min(args.batch_1024, 2)
    n = args.gpus or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    device = "CPU, gloo (smoke run)" if args.tiny else f"{n} x {torch.cuda.get_device_name(0)}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_multigpu_") as tmp:
        for config in args.configs.split(","):
            batch = args.batch_256 if config == "d30@256" else args.batch_1024
            for strategy in args.strategies.split(","):
                devices = 1 if strategy == "single" else n
                rows.append(run_one(args, config, strategy, devices, batch, tmp))
                bg.log(json.dumps({k: v for k, v in rows[-1].items() if k != "step_s_all"}))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows}, fh, indent=1)
    print(fmt_table(rows, device), flush=True)


if __name__ == "__main__":
    main()
