"""``starkit export CKPT OUT_DIR``: a training checkpoint -> a self-contained model directory."""
from __future__ import annotations

import argparse
import os
import re
from typing import List, Optional

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def export_checkpoint(ckpt_path: str, out_dir: str, dtype: Optional[str] = None, use_ema: bool = True,
                      copy_text_encoder: bool = False) -> str:
    """Load a ``ScaleWiseGenerator`` checkpoint (safely, weights only) and write a model directory."""
    from starkit.generator import ScaleWiseGenerator
    from starkit.pipeline import save_model_dir
    import pickle

    from starkit.utils.checkpoint_io import CONVERT_HINT, UnsafeCheckpointError, check_checkpoint_file
    consolidated = None
    if os.path.isdir(ckpt_path):  # an FSDP sharded checkpoint (a directory): consolidate it on the CPU first
        from starkit.generator.distributed import consolidate_checkpoint
        ckpt_path = consolidated = consolidate_checkpoint(ckpt_path)
    try:
        check_checkpoint_file(ckpt_path, "a training checkpoint")
        generator = ScaleWiseGenerator.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(f"refusing to load {ckpt_path!r}: it needs unsafe unpickling "
                                    f"(torch.load with weights_only=True failed).\n{CONVERT_HINT}") from err
    except ValueError as err:  # Lightning refuses a checkpoint of another class (e.g. a tokenizer's)
        other = re.search(r"The class '([^']+)' requested by the checkpoint does not resolve", str(err))
        if other is None:
            raise
        raise ValueError(f"{ckpt_path!r} is a checkpoint of {other.group(1)}, not of a ScaleWiseGenerator: "
                         f"`starkit export` writes a generator's model directory. Give a checkpoint of a generator "
                         f"run (e.g. recipes/generator/*.yaml); a tokenizer checkpoint is used through a generator "
                         f"recipe's tokenizer.init_args.pretrained.") from None
    finally:
        if consolidated is not None:
            os.remove(consolidated)
    save_model_dir(generator, out_dir, dtype=DTYPES[dtype] if dtype else None, use_ema=use_ema,
                   copy_text_encoder=copy_text_encoder)
    return out_dir


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="starkit export", description=__doc__)
    parser.add_argument("ckpt", help="a checkpoint written by `starkit fit` with a ScaleWiseGenerator: a file, or "
                        "the directory of an FSDP sharded checkpoint (consolidated on the CPU)")
    parser.add_argument("out_dir", help="the model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as trained)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even when an EMA exists")
    parser.add_argument("--copy-text-encoder", action="store_true",
                        help="copy a Hugging Face text encoder into the directory (self-contained)")
    args = parser.parse_args(argv)
    export_checkpoint(args.ckpt, args.out_dir, args.dtype, not args.no_ema, args.copy_text_encoder)
    print(f"wrote {args.out_dir}")
