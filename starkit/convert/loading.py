"""Build the parts of a (converted) model directory without ``ScaleWiseGenerator``: the
transformer, the conditioning encoder, the tokenizer and the sampler, weights loaded strictly.
Used by the equivalence checks and for model directories that need generator options
(AdaLN, no cross-attention) that ``ScaleWiseGenerator`` does not take yet."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ModelParts:
    """The parts of a model directory, as ``load_parts`` builds them.

    Args:
        transformer: the ``ScaleTransformer``.
        text_encoder: the conditioning encoder (a text encoder, or VAR's class ids).
        tokenizer: the ``MultiScaleVQ``.
        sampler: the saved sampler.
    """

    transformer: Any
    text_encoder: Any
    tokenizer: Any
    sampler: Any


def load_parts(model_dir: str, device: str = "cpu", text_encoder=None) -> ModelParts:
    """The transformer, conditioning encoder, tokenizer and sampler of a model directory.

    Args:
        model_dir: a directory written by ``starkit convert`` or ``starkit export``.
        device: where to put them.
        text_encoder: use this encoder instead of the one in ``starkit.json`` (only its ``dim`` must match).
    """
    from safetensors.torch import load_file

    from starkit.convert.common import check_against, expected_shapes
    from starkit.generator.transformer import ScaleTransformer, resolve_size
    from starkit.pipeline import _positional_factory, read_model_config, sampler_from_config, text_encoder_from_config
    from starkit.positional import NormalizedRoPE2D
    from starkit.tokenizers import MultiScaleVQ
    config = read_model_config(model_dir)
    tokenizer = MultiScaleVQ.from_pretrained(os.path.join(model_dir, config["tokenizer"]), frozen=True)
    if text_encoder is None:
        text_encoder = text_encoder_from_config(config, model_dir)
    g = config["generator"]
    arch = resolve_size(g.get("size", "d16"), g.get("depth"), g.get("width"), g.get("num_heads"))
    patch_nums = tuple(g.get("patch_nums") or tokenizer.patch_nums)
    positional = _positional_factory(config.get("positional")) or NormalizedRoPE2D
    adaln = bool(g.get("adaln", False))
    net = ScaleTransformer(patch_nums, tokenizer.codebook_size, tokenizer.embed_dim,
                           text_encoder.dim if g.get("cross_attention", True) else None, arch["depth"], arch["width"],
                           arch["num_heads"], positional(arch["width"], arch["num_heads"], patch_nums),
                           mlp_ratio=g.get("mlp_ratio", 4.0), head_norm=g.get("head_norm", True),
                           cond_dim=text_encoder.dim, adaln=adaln,
                           start_from_condition=g.get("start_from_condition", "proj"))
    sampler = sampler_from_config(config)
    if sampler is not None:
        sampler.build(arch["width"], text_encoder.dim, tokenizer.embed_dim, tokenizer.codebook_size,
                      arch["num_heads"], patch_nums)
    weights = load_file(os.path.join(model_dir, "generator.safetensors"), device="cpu")
    own = expected_shapes(net, "transformer.")
    sampler_own = expected_shapes(sampler, "sampler.") if sampler is not None else {}
    given = {k: v for k, v in weights.items() if k.startswith("transformer.")}
    check_against(own, given, os.path.join(model_dir, "generator.safetensors"))
    net.load_state_dict({k[len("transformer."):]: v.float() for k, v in given.items()}, strict=True)
    if sampler is not None:
        sampler_sd = {k[len("sampler."):]: v for k, v in weights.items() if k.startswith("sampler.")}
        if sampler_sd:
            check_against(sampler_own, {"sampler." + k: v for k, v in sampler_sd.items()}, model_dir)
            sampler.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sampler_sd.items()})
    return ModelParts(net.to(device).eval(), text_encoder.to(device), tokenizer.to(device),
                      sampler.to(device).eval() if sampler is not None else None)
