"""Progressive resolution: start a generator from one trained at other scales.

STAR trains d30 at 256, then continues at 512 from it, then at 1024 from the 512 weights
(STAR_REFERENCE section 6). The scales change between the stages; the transformer's
weights do not depend on them except for

- the level embedding ``lvl_embed.weight`` (one row per scale): the old rows are copied for
  the first ``K_old`` scales, the new scales start from the last old row;
- a learned absolute position embedding (VAR's): resized per scale by the encoding's own
  ``resize_state_dict``; RoPE has no weights.

Everything else must match in shape, else a clear error names the keys. The sampler head's
weights (a :class:`~starkit.samplers.StableSampler`) are copied too when both sides have them.

Used by ``ScaleWiseGenerator(init_from=...)``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Tuple

import torch

log = logging.getLogger(__name__)


def _old_patch_nums_from_hparams(hp: dict) -> Optional[Tuple[int, ...]]:
    if not isinstance(hp, dict):
        return None
    if hp.get("patch_nums"):
        return tuple(int(p) for p in hp["patch_nums"])
    tok = hp.get("tokenizer")
    if isinstance(tok, dict):
        pns = (tok.get("init_args") or {}).get("patch_nums")
        if pns:
            return tuple(int(p) for p in pns)
    return None


def newest_checkpoint_of_run(path: str) -> str:
    """A training run's folder (``trainer.default_root_dir``, e.g. ``runs/generator-tiny``) -> its newest
    ``last.ckpt`` (by modification time, over every ``lightning_logs/version_*``); a model directory, a file
    or a missing path is returned as it is."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "generator.safetensors")):
        return path
    import glob
    found = glob.glob(os.path.join(path, "**", "last.ckpt"), recursive=True)
    if not found:
        return path
    newest = max(found, key=os.path.getmtime)
    from lightning.pytorch.utilities import rank_zero_info
    rank_zero_info(f"init_from {path}: the newest last.ckpt of the run is {newest}")
    return newest


def load_source(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Optional[Tuple[int, ...]]]:
    """Read a Lightning checkpoint or a model directory.

    Returns:
        (transformer state dict without prefix, sampler state dict without prefix, old patch_nums or None).
        From a checkpoint, the EMA weights are preferred when present.
    """
    path = newest_checkpoint_of_run(path)
    if os.path.isdir(path):
        from safetensors.torch import load_file
        weights = os.path.join(path, "generator.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"init_from={path!r} is a directory without generator.safetensors (a model "
                                    f"directory) and without a last.ckpt below it (a training run's folder).")
        tensors = load_file(weights)
        patch_nums = None
        cfg_path = os.path.join(path, "starkit.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                patch_nums = _old_patch_nums_from_hparams(json.load(f).get("generator", {}))
        source = "transformer."
    elif os.path.isfile(path):
        from starkit.utils.checkpoint_io import safe_torch_load
        ckpt = safe_torch_load(path)
        tensors = ckpt.get("state_dict", ckpt)
        patch_nums = _old_patch_nums_from_hparams(ckpt.get("hyper_parameters", {}))
        source = "ema." if any(k.startswith("ema.") for k in tensors) else "transformer."
    else:
        raise FileNotFoundError(f"init_from={path!r}: no such checkpoint file or model directory (relative paths "
                                f"are read from the working directory). Resuming a run with --ckpt_path does not "
                                f"need it: add --model.init_args.init_from=null.")
    net = {k[len(source):]: v for k, v in tensors.items() if k.startswith(source)}
    if not net:
        raise ValueError(f"init_from={path!r} holds no '{source}*' weights (is it a ScaleWiseGenerator checkpoint?).")
    sampler = {k[len("sampler."):]: v for k, v in tensors.items() if k.startswith("sampler.")}
    log.info("init_from %s: %d transformer tensors from '%s*'%s", path, len(net), source,
             f", {len(sampler)} sampler tensors" if sampler else "")
    return net, sampler, patch_nums


def grow_levels(old: torch.Tensor, num_scales: int) -> torch.Tensor:
    """Level embedding ``(K_old, C)`` -> ``(K_new, C)``: old rows first, new rows copy the last old row."""
    if old.shape[0] >= num_scales:
        return old[:num_scales].clone()
    extra = old[-1:].expand(num_scales - old.shape[0], -1)
    return torch.cat([old, extra], dim=0)


def adapt_state_dict(target: Dict[str, torch.Tensor], source: Dict[str, torch.Tensor], what: str,
                     allow_missing: bool = False) -> Tuple[Dict[str, torch.Tensor], list, list]:
    """Match ``source`` to the shapes of ``target`` (level embeddings grown). Returns (adapted, copied, resized)."""
    missing = sorted(k for k in target if k not in source)
    unexpected = sorted(k for k in source if k not in target)
    out, copied, resized, mismatched = {}, [], [], []
    for key, ref in target.items():
        if key not in source:
            continue
        value = source[key]
        if tuple(value.shape) == tuple(ref.shape):
            out[key] = value
            copied.append(key)
        elif key.endswith("lvl_embed.weight") and value.ndim == 2 and value.shape[1] == ref.shape[1]:
            out[key] = grow_levels(value, ref.shape[0])
            resized.append(f"{key} {tuple(value.shape)} -> {tuple(ref.shape)}")
        else:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(ref.shape)}")
    problems = []
    if mismatched:
        problems.append("shape mismatches (source vs this model): " + ", ".join(mismatched))
    if missing and not allow_missing:
        problems.append("missing in the source: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected and not allow_missing:
        problems.append("not in this model: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        raise RuntimeError(f"init_from: the source {what} does not fit this generator's; " + "; ".join(problems)
                           + ". Only the number and sizes of scales may differ (size, depth, width, heads, "
                           "text encoder, tokenizer and positional encoding must be the same).")
    return out, copied, resized


def init_transformer_from(generator, path: str) -> dict:
    """Initialise ``generator.transformer`` (and its EMA and sampler head, when present) from the
    generator saved at ``path`` (a ``.ckpt`` of ``starkit fit`` or a model directory).

    Returns:
        a summary ``{"copied": [...], "resized": [...], "sampler": [...], "skipped": [...]}`` (also logged;
        ``skipped``: sampler tensors of either side that were not copied, with a warning).
    """
    net_src, sampler_src, old_patch_nums = load_source(str(path))
    net = generator.transformer
    positional = net.positional
    new_patch_nums = tuple(net.patch_nums)
    pos_keys = [k for k in net_src if k.startswith("positional.")]
    if pos_keys:
        if old_patch_nums is None:
            raise RuntimeError(f"init_from={path!r}: the source has a learned position embedding ({pos_keys[0]}) "
                               "but its patch_nums are unknown (not in its hyperparameters or starkit.json).")
        net_src = dict(net_src)
        positional.resize_state_dict(net_src, "positional.", old_patch_nums)
    target = net.state_dict()
    try:
        adapted, copied, resized = adapt_state_dict(target, net_src, "transformer")
    except RuntimeError as err:
        from starkit.utils.checkpoint_io import component_mismatches
        raise RuntimeError(" ".join([str(err)] + component_mismatches(target, net_src, prefix="",
                                                                      what=str(path)))) from None
    if pos_keys and old_patch_nums != new_patch_nums:
        resized += [f"{k} (scales {old_patch_nums} -> {new_patch_nums})" for k in pos_keys]
        copied = [k for k in copied if k not in pos_keys]
    net.load_state_dict(adapted, strict=True)
    if generator.ema is not None:
        generator.ema.load_state_dict(adapted, strict=True)
    sampler_copied = []
    sampler_target = generator.sampler.state_dict()
    # sampler tensors not copied: the source's without a place here, and this sampler's that keep their init
    skipped = [f"sampler.{k}" for k in sorted(set(sampler_src) - set(sampler_target))]
    if sampler_src:
        skipped += [f"sampler.{k}" for k in sorted(set(sampler_target) - set(sampler_src))]
    if sampler_src and sampler_target:
        sampler_adapted, sampler_copied, sampler_resized = adapt_state_dict(sampler_target, sampler_src, "sampler",
                                                                           allow_missing=True)
        if "head_trained" in sampler_adapted and any(k != "head_trained" for k in sampler_target
                                                     if k not in sampler_src):
            # a head copied in part (e.g. another head_depth) is not a trained head: it keeps this flag
            del sampler_adapted["head_trained"]
            sampler_copied = [k for k in sampler_copied if k != "head_trained"]
            skipped.append("sampler.head_trained (the head is copied in part)")
        generator.sampler.load_state_dict(sampler_adapted, strict=False)
        resized += [f"sampler.{r}" for r in sampler_resized]
    summary = {"copied": copied, "resized": resized, "sampler": sampler_copied, "skipped": skipped}
    log.info("init_from %s (scales %s -> %s): %d tensors copied, resized: %s; sampler tensors copied: %d",
             path, old_patch_nums, new_patch_nums, len(copied), resized or "none", len(sampler_copied))
    if skipped:
        from lightning.pytorch.utilities import rank_zero_warn
        rank_zero_warn(f"init_from {path}: {len(skipped)} sampler tensors not copied (the source's sampler and this "
                       f"one differ): {', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}")
    try:
        from lightning.pytorch.utilities import rank_zero_info
        rank_zero_info(f"init_from {path}: {len(copied)} tensors copied, resized: {resized or 'none'}, "
                       f"sampler tensors copied: {len(sampler_copied)}")
    except ImportError:  # pragma: no cover
        pass
    generator._init_from_summary = summary
    return summary
