"""``starkit convert``: official STAR / VAR checkpoints -> starkit model and tokenizer directories.

    starkit convert star-t2i STAR.pth vae_ch160v4096z32.pth stable-diffusion-2-1 models/star-1024
    starkit convert star-sampler-head STAR_SAMPLER.pth models/star-1024
    starkit convert var var_d16.pth vae_ch160v4096z32.pth models/var-d16
    starkit convert var-vae vae_ch160v4096z32.pth models/var-vae-256
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

DTYPES = ("float32", "float16", "bfloat16")


def _patch_nums(text: str):
    try:
        return tuple(int(p) for p in text.replace("_", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--patch-nums takes integers like 1,2,3,4, got {text!r}") from None


def _dtype(name: Optional[str]):
    import torch
    return getattr(torch, name) if name else None


def _scales(p):
    p.add_argument("--patch-nums", type=_patch_nums, default=None, help="scales, e.g. 1,2,3,4,5,6,8,10,13,16 "
                   "(default: read off the weights)")
    p.add_argument("--resolution", type=int, choices=(256, 512, 1024), default=None,
                   help="use the released scales of this resolution")


def _sampling(p, cfg, top_k, top_p):
    p.add_argument("--cfg", type=float, default=cfg, help=f"guidance of the saved sampler (default {cfg})")
    p.add_argument("--top-k", type=int, default=top_k, help=f"top-k of the saved sampler (default {top_k})")
    p.add_argument("--top-p", type=float, default=top_p, help=f"top-p of the saved sampler (default {top_p})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="starkit convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("star-t2i", help="an official STAR checkpoint -> a model directory")
    p.add_argument("checkpoint", help="official STAR file ({'trainer': {'var_wo_ddp': ...}} or a state dict)")
    p.add_argument("vae", help="VAR's vae_ch160v4096z32.pth (or a starkit tokenizer directory)")
    p.add_argument("text_encoder", help="CLIP text encoder directory (SD-2.1 folder or CLIPTextModel folder)")
    p.add_argument("out_dir", help="the model directory to write (starkit.json, generator.safetensors, tokenizer/)")
    _scales(p)
    p.add_argument("--rope-norm", type=float, default=64.0, help="RoPE normalisation N (released: 64)")
    p.add_argument("--rope-base", type=float, default=10000.0, help="RoPE base (released: 10000)")
    p.add_argument("--no-logit-norm", action="store_true", help="the checkpoint was trained with enable_logit_norm=False")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: as stored)")
    p.add_argument("--copy-text-encoder", action="store_true", help="copy the text encoder into the directory")
    _sampling(p, 4.5, 600, 0.8)
    p = sub.add_parser("star-sampler-head", help="add official sampler-head weights to a converted STAR directory")
    p.add_argument("head_checkpoint", help="a train_sampler.py checkpoint or a head-only state dict")
    p.add_argument("model_dir",
                   help="the converted STAR model directory the head is added to (starkit convert star-t2i)")
    p = sub.add_parser("var", help="VAR's class-conditional checkpoint -> a model directory (prompts: class ids)")
    p.add_argument("checkpoint", help="official VAR file (var_d16.pth ... var_d30.pth, or a state dict)")
    p.add_argument("vae", help="VAR's vae_ch160v4096z32.pth (or a starkit tokenizer directory)")
    p.add_argument("out_dir", help="the model directory to write")
    _scales(p)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: as stored)")
    _sampling(p, 1.5, 900, 0.96)
    p = sub.add_parser("var-vae", help="VAR's VQVAE -> a starkit tokenizer directory")
    p.add_argument("vae", help="VAR's vae_ch160v4096z32.pth")
    p.add_argument("out_dir", help="the tokenizer directory to write (config.json, model.safetensors)")
    _scales(p)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    from starkit import convert
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", convert.MissingSamplerHeadWarning)
            if args.kind == "star-t2i":
                out = convert.convert_star_t2i(
                    args.checkpoint, args.vae, args.text_encoder, args.out_dir, patch_nums=args.patch_nums,
                    resolution=args.resolution, rope_norm=args.rope_norm, rope_base=args.rope_base,
                    head_norm=not args.no_logit_norm, dtype=_dtype(args.dtype),
                    copy_text_encoder=args.copy_text_encoder,
                    sampling={"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p})
            elif args.kind == "star-sampler-head":
                out = convert.add_star_sampler_head(args.head_checkpoint, args.model_dir)
            elif args.kind == "var":
                out = convert.convert_var(args.checkpoint, args.vae, args.out_dir, patch_nums=args.patch_nums,
                                          resolution=args.resolution, dtype=_dtype(args.dtype),
                                          sampling={"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p})
            else:
                out = convert.convert_var_vae(args.vae, args.out_dir, patch_nums=args.patch_nums,
                                              resolution=args.resolution)
        for w in caught:  # re-issue (once each) so that callers and tests see them
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            print(f"warning: {w.message}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as err:
        print(f"starkit convert {args.kind}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(f"wrote {out}")
