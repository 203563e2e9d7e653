"""Official STAR (Davinci-XLab/STAR-T2I) checkpoints -> starkit model directories.

Key layout of the official ``VAR`` of ``models/var_drop.py`` (``rotary_pos_emb=True``,
``absolute_lvl_emb=True``, ``shared_aln=False``, ``attn_l2_norm=True``, ``enable_cross=True``)::

    word_embed.{weight,bias}  class_emb.weight (unused by STAR)  pos_start  lvl_embed.weight
    [pos_1LC (absolute-PE ablation, rotary_pos_emb=False)]
    blocks.N.attn.{mat_qkv.weight, q_bias, v_bias, zero_k_bias, scale_mul_1H11, proj.weight, proj.bias}
    blocks.N.cross_attn.{mat_q.weight, mat_kv.weight, q_bias, v_bias, zero_k_bias, scale_mul_1H11, proj.*}
    blocks.N.ffn.{fc1,fc2}.{weight,bias}
    head_logits.{weight,bias}  encoder_proj.{weight,bias}
    sampler head (enable_adaptive_norm=True): word_embed_head.*, feat_extract_blocks.N.* (no cross_attn),
    pos_start_last, head_logits2.*, encoder_proj2.*, head_proj.*, lvl_embed_2.weight

Non-affine LayerNorms (``ln_wo_grad``, ``logit_norm``) have no weights; whether the logits
head uses ``logit_norm`` (``enable_logit_norm``) and the RoPE normalisation / base are not
in the weights: they are arguments (defaults: the released configs, 64 / 10000 / True).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, Optional, Sequence

import torch

from starkit.convert.common import (CheckpointMismatchError, check_against, expected_shapes, load_state_dict,
                                    repeat_blocks,
                                    require, resolve_patch_nums, size_args, warn_once, write_generator_weights,
                                    write_model_config, write_tokenizer)

#: Official sampler-head parameter prefixes -> ours (under ``sampler.head.``).
HEAD_PREFIXES = {
    "word_embed_head.": "word_embed.",
    "feat_extract_blocks.": "blocks.",
    "pos_start_last": "pos_start",
    "head_logits2.": "head_logits.",
    "encoder_proj2.": "encoder_proj.",
    "head_proj.": "proj.",
    "lvl_embed_2.": "lvl_embed.",
}
UNSUPPORTED = ("lvl_embed_proj.", "lvl_embed_adaln.", "shared_ada_lin.")

#: The official sampling settings (sample.py defaults; the README's MJHQ evaluation uses cfg 4.0, top_k 4096).
OFFICIAL_SAMPLING = {"cfg": 4.5, "top_k": 600, "top_p": 0.8}


class MissingSamplerHeadWarning(UserWarning):
    """A STAR 1024 checkpoint without the sampler-head weights: sampling is parallel."""


def _rename_block_key(key: str) -> Optional[str]:
    """Official block-relative key -> ours; None for keys we drop (``zero_k_bias``)."""
    if key.endswith(".zero_k_bias"):
        return None
    return re.sub(r"(attn|cross_attn)\.scale_mul_1H11$", r"\1.qk_norm.scale_mul_1H11", key)


def is_head_key(key: str) -> bool:
    return key.startswith(tuple(HEAD_PREFIXES))


def map_star_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official STAR names -> starkit names (``transformer.*`` and ``sampler.head.*``). The buffers
    ``zero_k_bias`` (must be zero) and the unused ``class_emb.weight`` are dropped."""
    out = {}
    nonzero = [k for k, v in sd.items() if k.endswith("zero_k_bias") and bool(v.ne(0).any())]
    if nonzero:
        raise CheckpointMismatchError(f"zero_k_bias buffers are not zero in {nonzero[:4]}: not an official STAR file")
    for key, value in sd.items():
        if key == "class_emb.weight":
            continue
        head = next((p for p in HEAD_PREFIXES if key.startswith(p)), None)
        if head is not None:
            new = _rename_block_key(HEAD_PREFIXES[head] + key[len(head):])
            if new is not None:
                out["sampler.head." + new] = value
            continue
        if key == "pos_1LC":
            out["transformer.positional.pos_1LC"] = value
            continue
        new = _rename_block_key(key)
        if new is not None:
            out["transformer." + new] = value
    return out


def infer_star_config(sd: Dict[str, torch.Tensor], source: str = "the checkpoint") -> dict:
    """Architecture read off the shapes of an official STAR state dict."""
    require(sd, ("word_embed.weight", "encoder_proj.weight", "head_logits.weight", "lvl_embed.weight", "pos_start",
                 "blocks.0.attn.mat_qkv.weight", "blocks.0.attn.scale_mul_1H11", "blocks.0.ffn.fc1.weight"),
            f"an official STAR checkpoint ({source})")
    unsupported = sorted(k for k in sd if k.startswith(UNSUPPORTED) or k.endswith(".ada_gss") or ".ada_lin." in k)
    if unsupported:
        raise CheckpointMismatchError(f"{source} uses STAR's shared AdaLN (shared_aln=True), which starkit does not "
                                      f"implement: keys {unsupported[:6]}")
    depth = len([i for i in range(10_000) if f"blocks.{i}.attn.mat_qkv.weight" in sd])
    width, latent_dim = sd["word_embed.weight"].shape
    num_heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1]
    head_blocks = len([i for i in range(100) if f"feat_extract_blocks.{i}.attn.mat_qkv.weight" in sd])
    return dict(
        depth=depth, width=width, num_heads=num_heads, latent_dim=latent_dim,
        text_dim=sd["encoder_proj.weight"].shape[1], vocab_size=sd["head_logits.weight"].shape[0],
        num_scales=sd["lvl_embed.weight"].shape[0], mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / width,
        cross_attention="blocks.0.cross_attn.mat_q.weight" in sd,
        absolute_pe=sd["pos_1LC"].shape[1] if "pos_1LC" in sd else None,
        head_depth=head_blocks, has_head=any(is_head_key(k) for k in sd),
    )


def _clip_dim(clip_dir: str) -> Optional[int]:
    for sub in ("", "text_encoder"):
        cfg = os.path.join(clip_dir, sub, "config.json")
        if os.path.isfile(cfg):
            with open(cfg) as fh:
                data = json.load(fh)
            data = data.get("text_config", data)
            return data.get("hidden_size") or data.get("d_model")
    return None


def _stable_sampler_config(num_scales: int, head_depth: int, settings: dict) -> dict:
    causal = max(num_scales - 9, 1)  # official sample_from_idx=9: scales 9..K-1
    steps_last = 15 if num_scales >= 14 else 8  # official: 15 steps on si > 12, else 8
    return {"class_path": "starkit.samplers.StableSampler",
            "init_args": {**settings, "cfg_schedule": "linear", "causal_scales": causal, "steps": 8,
                          "steps_last": steps_last, "random_steps": 5, "schedule": "arccos",
                          "head_depth": head_depth, "use_head": True}}


def _parallel_sampler_config(settings: dict) -> dict:
    return {"class_path": "starkit.samplers.ParallelSampler", "init_args": {**settings, "cfg_schedule": "linear"}}


def _build_reference(arch: dict, patch_nums: Sequence[int], positional: dict, head_norm: bool, with_head: bool):
    """The names and shapes the weights must have (our transformer and head, built with one block)."""
    import functools

    from starkit.generator.transformer import ScaleTransformer
    from starkit.samplers.head import SamplerHead
    from starkit.positional import PositionalEncoding
    from starkit.utils.class_path import import_class
    pe_cls = functools.partial(import_class(positional["class_path"], PositionalEncoding, "positional"),
                               **positional.get("init_args", {}))
    pe = pe_cls(arch["width"], arch["num_heads"], patch_nums)
    net = ScaleTransformer(patch_nums, arch["vocab_size"], arch["latent_dim"],
                           arch["text_dim"] if arch["cross_attention"] else None, 1, arch["width"],
                           arch["num_heads"], pe, mlp_ratio=arch["mlp_ratio"], head_norm=head_norm,
                           cond_dim=arch["text_dim"])
    shapes = repeat_blocks(expected_shapes(net, "transformer."), arch["depth"])
    if with_head:
        head = SamplerHead(arch["width"], arch["text_dim"], arch["latent_dim"], arch["vocab_size"],
                           arch["num_heads"], len(patch_nums), depth=1, mlp_ratio=arch["mlp_ratio"])
        shapes.update(repeat_blocks(expected_shapes(head, "sampler.head."), arch["head_depth"]))
    return shapes


def convert_star_t2i(checkpoint: str, vae: str, text_encoder: str, out_dir: str,
                     patch_nums: Optional[Sequence[int]] = None, resolution: Optional[int] = None,
                     rope_norm: float = 64.0, rope_base: float = 10000.0, head_norm: bool = True,
                     dtype: Optional[torch.dtype] = None, copy_text_encoder: bool = False,
                     sampling: Optional[dict] = None) -> str:
    """Convert an official STAR checkpoint into a starkit model directory.

    Args:
        checkpoint: the official file (``{"trainer": {"var_wo_ddp": ...}}`` or a plain state dict).
        vae: VAR's ``vae_ch160v4096z32.pth`` (or a starkit tokenizer directory).
        text_encoder: the CLIP text encoder directory (SD-2.1 folder with ``text_encoder/`` and
            ``tokenizer/``, or a plain CLIPTextModel folder); referenced by absolute path unless copied.
        out_dir: the model directory to write.
        patch_nums / resolution: the scales (default: read off the weights; 14 scales = 1024,
            10 scales at depth 16 = 256; depth 30 with 10 scales needs one of them).
        rope_norm, rope_base: STAR's normalized RoPE (released: 64, 10000).
        head_norm: the logits head's non-affine LayerNorm (``enable_logit_norm``; released: True).
        dtype: cast the weights (default: as stored).
        copy_text_encoder: copy the text encoder folder into ``out_dir/text_encoder``.
        sampling: cfg / top_k / top_p of the saved sampler (default: the official sample.py's).
    """
    sd = load_state_dict(checkpoint)
    arch = infer_star_config(sd, checkpoint)
    pn = resolve_patch_nums(patch_nums, resolution, arch["num_scales"], arch["absolute_pe"],
                            256 if arch["depth"] == 16 else None, checkpoint)
    positional = ({"class_path": "starkit.positional.LearnedAbsolutePE", "init_args": {}} if arch["absolute_pe"]
                  else {"class_path": "starkit.positional.NormalizedRoPE2D",
                        "init_args": {"norm": float(rope_norm), "base": float(rope_base)}})
    tensors = map_star_keys(sd)
    hint = ("Check depth, patch_nums and the RoPE/absolute-PE choice; a file from a modified STAR (shared AdaLN, "
            "no QK-norm) is not supported.")
    check_against(_build_reference(arch, pn, positional, head_norm, arch["has_head"]), tensors, checkpoint, hint)

    dim = _clip_dim(text_encoder)
    if dim is None:
        raise FileNotFoundError(f"{text_encoder!r} is not a text-encoder directory (no config.json, nor "
                                f"text_encoder/config.json)")
    if dim != arch["text_dim"]:
        raise CheckpointMismatchError(f"the text encoder {text_encoder!r} is {dim}-d but the checkpoint's "
                                      f"encoder_proj.weight expects {arch['text_dim']}-d features (STAR: SD-2.1's CLIP, 1024)")

    settings = dict(OFFICIAL_SAMPLING, **(sampling or {}))
    if arch["has_head"]:
        sampler = _stable_sampler_config(len(pn), arch["head_depth"], settings)
        tensors["sampler.head_trained"] = torch.ones((), dtype=torch.long)
    else:
        sampler = _parallel_sampler_config(settings)
        if len(pn) >= 14:
            warn_once(f"{checkpoint} has no sampler-head weights (feat_extract_blocks.*, head_logits2.*, ...): the "
                      f"model samples every scale in parallel (ParallelSampler). Add the head with "
                      f"`starkit convert star-sampler-head HEAD.pth {out_dir}`.", MissingSamplerHeadWarning)

    os.makedirs(out_dir, exist_ok=True)
    write_tokenizer(vae, out_dir, pn, arch["vocab_size"], arch["latent_dim"])
    text_path = os.path.abspath(text_encoder)
    if copy_text_encoder:
        dest = os.path.join(out_dir, "text_encoder")
        if os.path.exists(dest):
            shutil.rmtree(dest)
        shutil.copytree(text_encoder, dest, ignore=shutil.ignore_patterns("unet", "vae", "*.ckpt", "*.bin.index*"))
        text_path = "${MODEL_DIR}/text_encoder"
    write_generator_weights(os.path.join(out_dir, "generator.safetensors"), tensors, dtype)
    generator = {**size_args(arch["depth"], arch["width"], arch["num_heads"]), "patch_nums": list(pn),
                 "mlp_ratio": arch["mlp_ratio"], "head_norm": bool(head_norm),
                 "drop_path_rate": 0.1 * arch["depth"] / 24, "ema_decay": None}
    if not arch["cross_attention"]:  # STAR's enable_cross=False ablation (needs ScaleWiseGenerator(cross_attention=))
        generator["cross_attention"] = False
    write_model_config(out_dir, {
        "generator": generator, "tokenizer": "tokenizer",
        "text_encoder": {"class_path": "starkit.text.HFTextEncoder",
                         "init_args": {"name_or_path": text_path, "kind": "clip"}},
        "positional": positional, "sampler": sampler,
        "converted_from": {"kind": "star-t2i", "checkpoint": os.path.abspath(checkpoint),
                           "sampler_head": bool(arch["has_head"])},
    })
    return out_dir


def add_star_sampler_head(head_checkpoint: str, model_dir: str, dtype: Optional[torch.dtype] = None) -> str:
    """Add official sampler-head weights (a head-only file, or a full ``train_sampler.py`` checkpoint whose
    other keys are ignored) to a converted STAR model directory, and switch it to the StableSampler."""
    from safetensors import safe_open

    from starkit.pipeline import read_model_config
    config = read_model_config(model_dir)
    sd = load_state_dict(head_checkpoint)
    head_sd = {k: v for k, v in sd.items() if is_head_key(k)}
    if not head_sd:
        raise CheckpointMismatchError(f"{head_checkpoint} has no sampler-head weights (keys starting with "
                                      f"{sorted(HEAD_PREFIXES)}); its keys start with {sorted(sd)[:8]}")
    tensors = map_star_keys(head_sd)
    weights_path = os.path.join(model_dir, "generator.safetensors")
    with safe_open(weights_path, "pt", device="cpu") as fh:
        existing = {k: fh.get_tensor(k) for k in fh.keys() if not k.startswith("sampler.")}
    g = config["generator"]
    width, heads = existing["transformer.word_embed.weight"].shape[0], g.get("num_heads")
    arch = dict(width=width, num_heads=heads, latent_dim=existing["transformer.word_embed.weight"].shape[1],
                text_dim=existing["transformer.encoder_proj.weight"].shape[1],
                vocab_size=existing["transformer.head_logits.weight"].shape[0], mlp_ratio=g.get("mlp_ratio", 4.0),
                head_depth=len([i for i in range(100) if f"feat_extract_blocks.{i}.attn.mat_qkv.weight" in head_sd]))
    from starkit.samplers.head import SamplerHead
    head = SamplerHead(arch["width"], arch["text_dim"], arch["latent_dim"], arch["vocab_size"], arch["num_heads"],
                       len(g["patch_nums"]), depth=1, mlp_ratio=arch["mlp_ratio"])
    check_against(repeat_blocks(expected_shapes(head, "sampler.head."), arch["head_depth"]), tensors, head_checkpoint,
                  f"The head must come from a STAR model of the same size as {model_dir}.")
    if dtype is None:
        dtype = existing["transformer.word_embed.weight"].dtype
    tensors["sampler.head_trained"] = torch.ones((), dtype=torch.long)
    existing.update(tensors)
    write_generator_weights(weights_path, existing, dtype)
    old = (config.get("sampler") or {}).get("init_args", {})
    settings = {k: old.get(k, v) for k, v in OFFICIAL_SAMPLING.items()}
    if "temperature" in old:
        settings["temperature"] = old["temperature"]
    config["sampler"] = _stable_sampler_config(len(g["patch_nums"]), arch["head_depth"], settings)
    config.setdefault("converted_from", {})["sampler_head"] = os.path.abspath(head_checkpoint)
    config.pop("format", None)
    config.pop("format_version", None)
    write_model_config(model_dir, config)
    return model_dir
