"""bf16 against fp32 for a TRAINED tokenizer: how many token indices and how much of the decoded image
change when the tokenizer runs under bf16 autocast (the fast path) instead of fp32.

With random weights (bench_tokenizer.py against VAR's code) bf16 moves 23-32% of the indices: a random
codebook has many near ties. A trained codebook has few; this script measures it on the shipped demo
tokenizer (models/demo/tokenizer, trained on the shapes world) and images of its validation split,
or on another saved tokenizer (``--tokenizer``, shapes images at ``--resolution``).

    python benchmarks/tokenizer_precision.py                                  # demo tokenizer, CPU bf16
    python benchmarks/tokenizer_precision.py --device cuda --num 1024         # on a GPU
    python benchmarks/tokenizer_precision.py --tokenizer path/to/saved --resolution 128
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from starkit.data.shapes import ShapesDataset, ShapesWorld  # noqa: E402
from starkit.tokenizers import MultiScaleVQ  # noqa: E402


def measure(tokenizer: MultiScaleVQ, images: torch.Tensor, device: torch.device) -> dict:
    """Index agreement (all scales and per scale, %) and decoded-image differences, bf16 vs fp32."""
    tokenizer = tokenizer.to(device).eval()
    images = images.to(device)
    with torch.no_grad():
        ref = tokenizer.encode(images)  # fp32 reference
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = tokenizer.encode(images)
            decoded_low = tokenizer.decode(ref).float()
        decoded = tokenizer.decode(ref)
    agree = torch.cat([(a == b).flatten() for a, b in zip(ref, low)]).float().mean().item() * 100
    diff = (decoded_low - decoded).abs()
    return {"agree_pct": agree, "agree_per_scale_pct": [(a == b).float().mean().item() * 100 for a, b in zip(ref, low)],
            "decode_max_abs": diff.max().item(), "decode_mean_abs": diff.mean().item(),
            "patch_nums": list(tokenizer.patch_nums), "images": images.shape[0]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(HERE), "models", "demo", "tokenizer"))
    ap.add_argument("--resolution", type=int, default=64, help="image side of the shapes images")
    ap.add_argument("--num", type=int, default=256, help="number of validation images")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    tokenizer = MultiScaleVQ.from_pretrained(args.tokenizer)
    data = ShapesDataset(ShapesWorld(resolution=args.resolution), "val", args.num)
    images = torch.stack([data[i]["image"] for i in range(args.num)])  # (N, 3, R, R) in [-1, 1]
    r = measure(tokenizer, images, torch.device(args.device))
    print(f"\n### bf16 vs fp32, trained tokenizer {args.tokenizer} ({args.device}, {r['images']} images, "
          f"scales {r['patch_nums']})\n")
    print("| index agreement | per scale, small to large | decoded max abs diff | mean abs diff |")
    print("|---|---|---|---|")
    print(f"| {r['agree_pct']:.2f}% | {' / '.join(f'{p:.1f}' for p in r['agree_per_scale_pct'])} | "
          f"{r['decode_max_abs']:.4f} | {r['decode_mean_abs']:.5f} |")
    return r


if __name__ == "__main__":
    main()
