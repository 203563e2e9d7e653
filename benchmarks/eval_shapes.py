"""ShapesScore of a model directory on shapes-world prompts (the demo model's evaluation and ablations).

    python benchmarks/eval_shapes.py models/demo --num 512 --seeds 0,1
    python benchmarks/eval_shapes.py models/demo --sampler parallel --cfg 2.0 --json $OUT/eval.json
    python benchmarks/eval_shapes.py models/demo --fp8          # the blocks' products in float8 e4m3

Loads MODEL_DIR with ``StarPipeline.from_pretrained``, generates one image per prompt for the
first ``--num`` prompts of ``--split`` (held-out colour-shape combinations by default) with
each seed, scores them with ``starkit.eval.ShapesScore`` and prints a markdown table
(percent; one row per seed and their mean). Batch ``b`` of seed ``s`` is sampled with seed
``s * 100003 + b``. Runs on CPU (default when no GPU) or GPU; needs no jsonargparse.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from starkit.callbacks.shapes_eval import format_table  # noqa: E402
from starkit.data.shapes import SKILLS, ShapesWorld  # noqa: E402


def sampler_config(model_dir: str, choice: str) -> dict | None:
    """``None`` keeps the saved sampler; ``parallel`` / ``stable`` build one with the saved settings."""
    from starkit.pipeline import read_model_config
    saved = read_model_config(model_dir).get("sampler") or {}
    if choice == "saved":
        return None
    name = {"parallel": "starkit.samplers.ParallelSampler", "stable": "starkit.samplers.StableSampler"}[choice]
    args = dict(saved.get("init_args") or {})
    saved_class = (saved.get("class_path") or "").rsplit(".", 1)[-1]  # module paths differ: compare class names
    if name.rsplit(".", 1)[-1] != saved_class:
        common = ("cfg", "cfg_schedule", "top_k", "top_p", "temperature")
        args = {k: v for k, v in args.items() if k in common}
    return {"class_path": name, "init_args": args}


def evaluate(model_dir: str, num: int = 512, seeds=(0,), sampler: str = "saved", cfg=None, split: str = "heldout",
             batch_size: int = 64, device: str = "auto", world_seed: int = 0, save_grid: str | None = None,
             fp8: bool = False) -> dict:
    """Scores per seed and their mean: ``{"rows": [(name, scores)], "seconds": ...}``."""
    from starkit.eval import ShapesScore
    from starkit.pipeline import StarPipeline
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StarPipeline.from_pretrained(model_dir, device=device, sampler=sampler_config(model_dir, sampler))
    gen = pipe.generator
    world = ShapesWorld(64, seed=world_seed)
    stream = "val" if split == "train" else split
    truths = [world.scene(i, stream) for i in range(num)]
    rows, timings = [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    for seed in seeds:
        metric = ShapesScore(input_range="0,1")
        t0 = time.perf_counter()
        first = None
        for b, start in enumerate(range(0, num, batch_size)):
            chunk = truths[start:start + batch_size]
            with torch.no_grad(), autocast:
                images = gen.generate([t["caption"] for t in chunk], cfg=cfg, seed=seed * 100003 + b, fp8=fp8)
            images = images.float().clamp(0, 1).cpu()
            if first is None:
                first = images[:64]
            metric.update(images, chunk)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - t0)
        scores = {k: float(v) for k, v in metric.compute().items()}
        rows.append((f"seed {seed}", scores))
        if save_grid and seed == seeds[0] and first is not None:
            from starkit.callbacks.grid_writer import GridWriter
            from starkit.utils.io import images_to_pil
            grid = GridWriter(padding=2).grid(first, nrow=8)
            images_to_pil(grid[None])[0].save(save_grid)
    if len(rows) > 1:
        mean = {k: sum(r[1][k] for r in rows) / len(rows) for k in ["overall"] + SKILLS}
        mean["num_samples"] = sum(r[1]["num_samples"] for r in rows)
        rows.append(("mean", mean))
    return {"rows": rows, "seconds_per_seed": timings, "device": device, "model_dir": model_dir, "num": num,
            "split": split, "sampler": sampler, "cfg": cfg, "sampler_config": dict(gen.sampler.hparams or {}),
            "sampler_class": type(gen.sampler).__name__, "fp8": fp8}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a model directory (starkit export / StarPipeline.save_pretrained)")
    parser.add_argument("--num", type=int, default=512, help="prompts per seed")
    parser.add_argument("--seeds", default="0", help="comma-separated sampling seeds, e.g. 0,1")
    parser.add_argument("--sampler", choices=["saved", "stable", "parallel"], default="saved",
                        help="the model's own sampler (default), or StableSampler / ParallelSampler with its settings")
    parser.add_argument("--cfg", type=float, default=None, help="guidance weight (default: the sampler's)")
    parser.add_argument("--split", choices=["heldout", "train"], default="heldout")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fp8", action="store_true", help="generate(fp8=True): the blocks' products in float8")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--save-grid", default=None, help="write a grid PNG of the first seed's first 64 images")
    args = parser.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    result = evaluate(args.model_dir, args.num, seeds, args.sampler, args.cfg, args.split, args.batch_size,
                      args.device, save_grid=args.save_grid, fp8=args.fp8)
    print(f"ShapesScore of {args.model_dir}: {args.num} {args.split} prompts per seed, sampler "
          f"{result['sampler_class']} {json.dumps(result['sampler_config'])}, cfg override {args.cfg}, "
          f"{'fp8 products, ' if args.fp8 else ''}"
          f"{result['device']}, {', '.join(f'{t:.1f}' for t in result['seconds_per_seed'])} s per seed "
          f"(generation + scoring)")
    print(format_table(result["rows"]))
    if args.json:
        clean = json.loads(json.dumps(result, default=str).replace("NaN", "null"))
        with open(args.json, "w") as fh:
            json.dump(clean, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
