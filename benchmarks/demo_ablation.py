"""Ablations of the demo model on the shapes world, scored by ShapesScore on held-out prompts.

    python benchmarks/demo_ablation.py prepare                  # render the cached training sets
    python benchmarks/demo_ablation.py train64 --steps 3000     # each positional encoding x seed, 64 px
    python benchmarks/demo_ablation.py train128 --steps 1500    # each continued from its 64 px run to 128 px
    python benchmarks/demo_ablation.py eval --json ablation.json
    python benchmarks/demo_ablation.py demo-eval models/demo --json demo_eval.json   # sampler and CFG sweeps

Every run is `starkit fit` on a config derived from recipes/demo/generator.yaml (written
beside the run as config.yaml, so any row can be re-run alone): same model (depth 6, width
256), tokenizer (runs/demo/tokenizer/last.ckpt, train it first), text encoder, batch and
optimiser; only the positional encoding and the seed change. The training set is a fixed
100k-scene (64 px) / 40k-scene (128 px) shapes set rendered once (`ShapesCache`), so that
`--parallel` runs share the GPU without fighting over CPU for rendering. The 128 px runs
start from their 64 px checkpoint (`init_from`), with 10 scales (1..16) and the same
tokenizer, as STAR continues 256 -> 512 -> 1024 with one VAE. Scores: 512 held-out prompts
per model, the recipe's sampler (parallel, CFG 2.5), sampling seed 0.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "normalized_rope": {"class_path": "starkit.positional.NormalizedRoPE2D", "init_args": {"norm": 64.0, "base": 10000.0}},
    "rope": {"class_path": "starkit.positional.RoPE2D", "init_args": {"base": 100.0}},
    "learned": {"class_path": "starkit.positional.LearnedAbsolutePE", "init_args": {}},
}
PATCH_NUMS = {64: [1, 2, 3, 4, 5, 6, 8], 128: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]}
NUM_TRAIN = {64: 100_000, 128: 40_000}


def num_train(args, res: int) -> int:
    return args.num_train or NUM_TRAIN[res]


def run_dir(out: str, variant: str, seed: int, res: int) -> str:
    return os.path.join(out, f"{variant}_s{seed}_{res}")


def make_config(base: dict, out: str, variant: str, seed: int, res: int, steps: int, max_minutes: float,
                lr: float | None, cache_dir: str, workers: int, num_train: int) -> dict:
    """The demo generator config with one positional encoding, seed and resolution."""
    cfg = copy.deepcopy(base)
    directory = run_dir(out, variant, seed, res)
    cfg["seed_everything"] = seed
    trainer = cfg["trainer"]
    trainer.update(max_steps=steps, max_time=f"00:00:{int(max_minutes):02d}:{int(max_minutes % 1 * 60):02d}",
                   default_root_dir=directory, limit_val_batches=0, log_every_n_steps=50)
    trainer.pop("val_check_interval", None)
    trainer["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": directory, "save_last": True, "save_top_k": 0}}]
    model = cfg["model"]["init_args"]
    model["positional"] = copy.deepcopy(VARIANTS[variant])
    model["tokenizer"]["init_args"]["patch_nums"] = PATCH_NUMS[res]
    model["warmup_steps"] = min(model.get("warmup_steps", 500), steps // 10)
    if lr is not None:
        model["lr"] = lr
    if res != 64:
        model["init_from"] = os.path.join(run_dir(out, variant, seed, 64), "last.ckpt")
    data = cfg["data"]["init_args"]
    data.update(resolution=res, num_train=num_train, cache_dir=cache_dir, num_workers=workers)
    return cfg


def launch_all(configs: list, parallel: int) -> list:
    """Run ``starkit fit`` on each (name, config path) with at most ``parallel`` at once."""
    pending, running, results = list(configs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            name, path = pending.pop(0)
            log = open(os.path.join(os.path.dirname(path), "fit.log"), "w")
            proc = subprocess.Popen([sys.executable, "-m", "starkit", "fit", "--config", path], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=ROOT)
            running.append((name, proc, time.time(), log))
            print(f"started {name}", flush=True)
        for item in list(running):
            name, proc, t0, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                results.append({"name": name, "rc": proc.returncode, "seconds": round(time.time() - t0, 1)})
                print(f"finished {name}: rc {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
        time.sleep(2)
    return results


def train(args, res: int) -> None:
    with open(os.path.join(ROOT, "recipes/demo/generator.yaml")) as fh:
        base = yaml.safe_load(fh)
    configs = []
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = make_config(base, args.out, variant, seed, res, args.steps, args.max_minutes, args.lr,
                              args.cache_dir, args.workers, num_train(args, res))
            directory = run_dir(args.out, variant, seed, res)
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, "config.yaml")
            with open(path, "w") as fh:
                fh.write(f"# python -m starkit fit --config {path}\n")
                yaml.safe_dump(cfg, fh, sort_keys=False)
            configs.append((os.path.basename(directory), path))
    results = launch_all(configs, args.parallel)
    with open(os.path.join(args.out, f"train{res}.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    if any(r["rc"] for r in results):
        print("some runs failed: see their fit.log", flush=True)


def prepare(args) -> None:
    from starkit.data.shapes import ShapesCache, ShapesWorld
    for res in (64, 128):
        t0 = time.time()
        cache = ShapesCache(args.cache_dir, ShapesWorld(res), "train", num_train(args, res)).build(args.processes)
        print(f"cache {cache.folder}: {time.time() - t0:.0f} s", flush=True)


def evaluate_dir(model_dir: str, num: int, seeds, sampler: str = "saved", cfg=None) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from eval_shapes import evaluate
    result = evaluate(model_dir, num=num, seeds=seeds, sampler=sampler, cfg=cfg)
    return dict(result["rows"][-1][1])  # the mean over seeds (or the only seed)


def ablation_eval(args) -> None:
    rows = []
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for res in (64, 128):
                directory = run_dir(args.out, variant, seed, res)
                ckpt = os.path.join(directory, "last.ckpt")
                if not os.path.exists(ckpt):
                    rows.append({"variant": variant, "seed": seed, "res": res, "error": "no checkpoint"})
                    continue
                model_dir = os.path.join(directory, "model")
                if not os.path.exists(os.path.join(model_dir, "starkit.json")):
                    subprocess.run([sys.executable, "-m", "starkit", "export", ckpt, model_dir], check=True, cwd=ROOT)
                scores = evaluate_dir(model_dir, args.num, (0,))
                steps = _trained_steps(ckpt)
                rows.append({"variant": variant, "seed": seed, "res": res, "steps": steps, **scores})
                print(json.dumps(rows[-1]), flush=True)
    _write(args.json, {"rows": rows, "num": args.num})
    print(ablation_table(rows))


def _trained_steps(ckpt: str) -> int:
    import torch
    return int(torch.load(ckpt, map_location="cpu", weights_only=False).get("global_step", -1))


def ablation_table(rows: list) -> str:
    """Markdown: one line per variant, overall ShapesScore (%) per seed and mean, at 64 and 128 px."""
    lines = ["| positional encoding | 64 px: seeds | 64 px: mean | 128 px (from 64): seeds | 128 px: mean |",
             "|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for res in (64, 128):
            vals = [r.get("overall") for r in rows if r["variant"] == variant and r["res"] == res]
            good = [v for v in vals if v is not None]
            cells.append(", ".join("n/a" if v is None else f"{100 * v:.1f}" for v in vals))
            cells.append(f"{100 * sum(good) / len(good):.1f}" if good else "n/a")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def demo_eval(args) -> None:
    """Stable vs parallel sampler and a CFG sweep on one model directory (2 sampling seeds each)."""
    seeds = tuple(int(s) for s in args.seeds.split(","))
    rows = []
    for sampler in ("stable", "parallel"):
        for cfg in (float(c) for c in args.cfgs.split(",")):
            scores = evaluate_dir(args.model_dir, args.num, seeds, sampler=sampler, cfg=cfg)
            rows.append({"sampler": sampler, "cfg": cfg, **scores})
            print(json.dumps(rows[-1]), flush=True)
    _write(args.json, {"rows": rows, "num": args.num, "seeds": seeds, "model_dir": args.model_dir})
    lines = ["| sampler | " + " | ".join(f"CFG {c}" for c in args.cfgs.split(",")) + " |",
             "|---|" + "---|" * len(args.cfgs.split(","))]
    for sampler in ("stable", "parallel"):
        vals = [r["overall"] for r in rows if r["sampler"] == sampler]
        lines.append(f"| {sampler} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |")
    print("\n".join(lines))


def _write(path, payload) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(json.loads(json.dumps(payload, default=str).replace("NaN", "null")), fh, indent=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["prepare", "train64", "train128", "eval", "demo-eval"])
    parser.add_argument("model_dir", nargs="?", default="models/demo", help="demo-eval: the model directory")
    parser.add_argument("--out", default="runs/ablation", help="where the runs go")
    parser.add_argument("--cache-dir", default="runs/cache", help="ShapesCache folder")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1", help="training seeds (demo-eval: sampling seeds)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--max-minutes", type=float, default=6.0, help="Trainer max_time of each run")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's lr")
    parser.add_argument("--parallel", type=int, default=6, help="runs at once on the GPU")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per run")
    parser.add_argument("--num-train", type=int, default=None, help="cached scenes (default: 100k at 64, 40k at 128)")
    parser.add_argument("--processes", type=int, default=None, help="prepare: rendering processes")
    parser.add_argument("--num", type=int, default=512, help="held-out prompts per evaluation")
    parser.add_argument("--cfgs", default="0,1,2.5,4,6", help="demo-eval: guidance weights")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.phase == "prepare":
        prepare(args)
    elif args.phase in ("train64", "train128"):
        train(args, int(args.phase[5:]))
    elif args.phase == "eval":
        ablation_eval(args)
    else:
        demo_eval(args)


if __name__ == "__main__":
    main()
