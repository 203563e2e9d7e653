"""Official VAR (FoundationVision/VAR) checkpoints -> starkit model / tokenizer directories.

Key layout of VAR's class-conditional ``VAR`` (``models/var.py``, ``shared_aln=False``,
``attn_l2_norm=True``, as released in ``var_d{16,20,24,30}.pth``)::

    word_embed.{weight,bias}  class_emb.weight (num_classes + 1, C)  pos_start (1, 1, C)
    pos_1LC (1, L, C)  lvl_embed.weight (K, C)  buffers lvl_1L, attn_bias_for_masking
    blocks.N.attn.{mat_qkv.weight, q_bias, v_bias, zero_k_bias, scale_mul_1H11, proj.weight, proj.bias}
    blocks.N.ffn.{fc1,fc2}.{weight,bias}  blocks.N.ada_lin.1.{weight,bias} (6C x C)
    head_nm.ada_lin.1.{weight,bias} (2C x C)  head.{weight,bias}

The class embedding goes to :class:`~starkit.text.ClassConditioner` (``class_emb.safetensors``);
the transformer is ours with ``adaln=True`` and ``start_from_condition="identity"``.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch

from starkit.convert.common import (CheckpointMismatchError, check_against, expected_shapes, load_state_dict,
                                    repeat_blocks,
                                    require, resolve_patch_nums, size_args, write_generator_weights,
                                    write_model_config, write_tokenizer)

#: VAR's FID settings (README: cfg=1.5, top_p=0.96, top_k=900, more_smooth=False).
VAR_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}
DROPPED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


def map_var_keys(sd):
    """VAR names -> (starkit transformer tensors, class embedding)."""
    out = {}
    nonzero = [k for k, v in sd.items() if k.endswith("zero_k_bias") and bool(v.ne(0).any())]
    if nonzero:
        raise CheckpointMismatchError(f"zero_k_bias buffers are not zero in {nonzero[:4]}: not an official VAR file")
    for key, value in sd.items():
        if key in DROPPED_BUFFERS or key.endswith(".zero_k_bias") or key == "class_emb.weight":
            continue
        if key == "pos_1LC":
            new = "positional.pos_1LC"
        elif key.startswith("head."):
            new = "head_logits." + key[len("head."):]
        else:
            new = re.sub(r"attn\.scale_mul_1H11$", "attn.qk_norm.scale_mul_1H11", key)
        out["transformer." + new] = value
    return out, sd["class_emb.weight"]


def infer_var_config(sd, source: str = "the checkpoint") -> dict:
    require(sd, ("word_embed.weight", "class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight",
                 "blocks.0.attn.mat_qkv.weight", "blocks.0.ffn.fc1.weight", "head.weight"),
            f"an official VAR checkpoint ({source})")
    if "blocks.0.attn.scale_mul_1H11" not in sd:
        raise CheckpointMismatchError(f"{source} was trained without attn_l2_norm (no blocks.N.attn.scale_mul_1H11); "
                                      f"starkit implements VAR's released configuration (attn_l2_norm=True) only")
    shared = sorted(k for k in sd if k.startswith("shared_ada_lin.") or k.endswith(".ada_gss"))
    if shared or "blocks.0.ada_lin.1.weight" not in sd:
        raise CheckpointMismatchError(f"{source} uses shared AdaLN (shared_aln=True) or none: keys "
                                      f"{shared[:6] or ['blocks.0.ada_lin.1.weight (missing)']}; starkit implements "
                                      f"VAR's released per-block AdaLN (shared_aln=False)")
    width, latent_dim = sd["word_embed.weight"].shape
    return dict(
        depth=len([i for i in range(10_000) if f"blocks.{i}.attn.mat_qkv.weight" in sd]), width=width,
        num_heads=sd["blocks.0.attn.scale_mul_1H11"].shape[1], latent_dim=latent_dim,
        vocab_size=sd["head.weight"].shape[0], num_classes=sd["class_emb.weight"].shape[0] - 1,
        num_scales=sd["lvl_embed.weight"].shape[0], seq_len=sd["pos_1LC"].shape[1],
        mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / width,
    )


def _reference_shapes(arch: dict, patch_nums):
    from starkit.generator.transformer import ScaleTransformer
    from starkit.positional import LearnedAbsolutePE
    pe = LearnedAbsolutePE(arch["width"], arch["num_heads"], patch_nums)
    net = ScaleTransformer(patch_nums, arch["vocab_size"], arch["latent_dim"], None, 1, arch["width"],
                           arch["num_heads"], pe, mlp_ratio=arch["mlp_ratio"], cond_dim=arch["width"], adaln=True,
                           start_from_condition="identity")
    return repeat_blocks(expected_shapes(net, "transformer."), arch["depth"])


def convert_var(checkpoint: str, vae: str, out_dir: str, patch_nums: Optional[Sequence[int]] = None,
                resolution: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                sampling: Optional[dict] = None) -> str:
    """Convert VAR's class-conditional checkpoint (``var_d16.pth`` ...) into a model directory whose
    "prompts" are class ids (``"207"``; ``""`` is the unconditional class).

    Args:
        checkpoint: the VAR state dict.
        vae: VAR's ``vae_ch160v4096z32.pth`` (or a starkit tokenizer directory).
        out_dir: the model directory to write.
        patch_nums / resolution: the scales (default: read off ``pos_1LC``).
        dtype: cast the weights (default: as stored).
        sampling: cfg / top_k / top_p of the saved ParallelSampler (default VAR's FID settings).
    """
    sd = load_state_dict(checkpoint)
    arch = infer_var_config(sd, checkpoint)
    pn = resolve_patch_nums(patch_nums, resolution, arch["num_scales"], arch["seq_len"], None, checkpoint)
    tensors, class_emb = map_var_keys(sd)
    check_against(_reference_shapes(arch, pn), tensors, checkpoint, "Check depth and patch_nums.")
    os.makedirs(out_dir, exist_ok=True)
    write_tokenizer(vae, out_dir, pn, arch["vocab_size"], arch["latent_dim"])
    write_generator_weights(os.path.join(out_dir, "generator.safetensors"), tensors, dtype)
    write_generator_weights(os.path.join(out_dir, "class_emb.safetensors"), {"class_emb.weight": class_emb}, dtype)
    generator = {**size_args(arch["depth"], arch["width"], arch["num_heads"]), "patch_nums": list(pn),
                 "mlp_ratio": arch["mlp_ratio"], "drop_path_rate": 0.1 * arch["depth"] / 24, "ema_decay": None,
                 "adaln": True, "cross_attention": False, "start_from_condition": "identity"}
    write_model_config(out_dir, {
        "generator": generator, "tokenizer": "tokenizer",
        "text_encoder": {"class_path": "starkit.text.ClassConditioner",
                         "init_args": {"num_classes": arch["num_classes"], "dim": arch["width"],
                                       "weights": "${MODEL_DIR}/class_emb.safetensors"}},
        "positional": {"class_path": "starkit.positional.LearnedAbsolutePE", "init_args": {}},
        "sampler": {"class_path": "starkit.samplers.ParallelSampler",
                    "init_args": {**VAR_SAMPLING, **(sampling or {}), "cfg_schedule": "linear"}},
        "converted_from": {"kind": "var", "checkpoint": os.path.abspath(checkpoint)},
    })
    return out_dir


def convert_var_vae(vae: str, out_dir: str, patch_nums: Optional[Sequence[int]] = None,
                    resolution: Optional[int] = None) -> str:
    """VAR's VQVAE file -> a starkit tokenizer directory (``config.json`` + ``model.safetensors``)."""
    from starkit.convert.common import PATCH_NUMS, check_vae_file
    from starkit.tokenizers import MultiScaleVQ
    if patch_nums is not None and resolution is not None:
        raise ValueError("give either patch_nums or resolution, not both")
    check_vae_file(vae)
    pn = patch_nums or PATCH_NUMS[int(resolution or 256)]
    MultiScaleVQ.from_pretrained(vae, patch_nums=list(pn)).save_pretrained(out_dir)
    return out_dir
