"""Is ShapesScore trustworthy? Accuracy on cases whose right answer is known (CPU, < 2 min).

    python benchmarks/shapes_trust.py [--n 512]

Rows: ground-truth renders (held-out and train splits, 64 and 128 px) should score ~100%;
renders degraded like an imperfect tokenizer (Gaussian blur, JPEG quality 50, colour
jitter) should stay near 100%; pure noise should score ~0%; ground-truth images paired
with shuffled prompts should score near the analytic chance level (a perfect detector on
the same re-pairing, computed from the ground-truth objects). The table is printed last.
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image, ImageFilter

from starkit.data.shapes import SKILLS, ShapesWorld
from starkit.eval import ShapesScore, chance_level


def degrade(image: Image.Image, rng: np.random.Generator, jpeg: bool = True) -> Image.Image:
    """Blur (sigma 0.6 px at 64 px), JPEG quality 50 (4:2:0), per-channel gain +-8%, offset +-10."""
    image = image.filter(ImageFilter.GaussianBlur(0.6 * image.size[0] / 64))
    if jpeg:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=50)
        image = Image.open(buffer).convert("RGB")
    x = np.asarray(image).astype(np.float32)
    x = x * rng.uniform(0.92, 1.08, size=3) + rng.uniform(-10, 10)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) floats in [-1, 1]."""
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images]))  # (B, H, W, 3)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def score(images: torch.Tensor, truths) -> dict:
    metric = ShapesScore()
    for i in range(0, len(truths), 128):
        metric.update(images[i:i + 128], truths[i:i + 128])
    return {k: float(v) for k, v in metric.compute().items()}


def main(n: int = 512, seed: int = 0) -> None:
    rows = []
    for resolution in (64, 128):
        world = ShapesWorld(resolution, seed=seed)
        for split in ("heldout", "train"):
            renders = [world.render(i, split) for i in range(n)]
            images, truths = to_tensor([r[0] for r in renders]), [r[2] for r in renders]
            start = time.perf_counter()
            result = score(images, truths)
            seconds = time.perf_counter() - start
            rows.append((f"{split} renders", resolution, result, f"{seconds:.2f} s"))
            if split == "heldout":
                rng = np.random.default_rng(seed)
                blurred = to_tensor([degrade(r[0], rng) for r in renders])
                rows.append(("heldout, blur+JPEG50+jitter", resolution, score(blurred, truths), ""))
                soft = to_tensor([degrade(r[0], rng, jpeg=False) for r in renders])
                rows.append(("heldout, blur+jitter (no JPEG)", resolution, score(soft, truths), ""))
                order = np.random.default_rng(seed + 1).permutation(n)
                shuffled = [truths[j] for j in order]
                chance = chance_level(truths, [t["objects"] for t in truths])
                rows.append(("heldout, shuffled prompts", resolution, score(images, shuffled),
                             f"chance {100 * chance:.1f}%"))
                noise = torch.rand(n, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1
                rows.append(("uniform noise", resolution, score(noise, truths), ""))
                coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed + 2)) * 2 - 1
                smooth = torch.nn.functional.interpolate(coarse, size=resolution, mode="bilinear")
                rows.append(("smooth colour noise (8x8 up)", resolution, score(smooth, truths), ""))
    header = f"{'case':32s} {'px':>4s} {'overall':>8s} " + " ".join(f"{s[:10]:>10s}" for s in SKILLS) + "  note"
    print(f"ShapesScore trust table, n={n} prompts per row, seed={seed}, CPU")
    print(header)
    for name, resolution, result, note in rows:
        cells = " ".join(f"{100 * result[s]:10.1f}" for s in SKILLS)
        print(f"{name:32s} {resolution:4d} {100 * result['overall']:8.1f} {cells}  {note}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="prompts per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.n, args.seed)
