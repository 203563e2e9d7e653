"""Shared pieces of the converters: safe reading, key checks, known scales, model-directory writing."""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from starkit.utils.checkpoint_io import NotACheckpointError, check_checkpoint_file  # noqa: F401 (NotA...: re-exported)
from starkit.utils.io import atomic_save_safetensors, atomic_write_bytes

#: The scale sets of the released STAR / VAR models.
PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}

UNSAFE_HINT = (
    "Only plain state dicts are read (torch.load(weights_only=True) or .safetensors). If you trust the "
    "file, re-save its tensors once:\n"
    "    obj = torch.load(path, weights_only=False, map_location='cpu')  # runs the file's pickled code\n"
    "    torch.save(obj['trainer']['var_wo_ddp'] if 'trainer' in obj else obj, 'clean.pth')"
)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the architecture it is converted to."""


def load_state_dict(path: str, nested: Sequence[Sequence[str]] = (("trainer", "var_wo_ddp"), ("state_dict",),
                                                                   ("model",))) -> Dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a ``.pth`` / ``.pt`` / ``.ckpt`` (``weights_only=True``, memory-mapped
    when possible) or a ``.safetensors`` file. Official trainer files (``{"trainer": {"var_wo_ddp": sd}}``)
    are unwrapped. Anything that needs unsafe unpickling is refused with a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    check_checkpoint_file(path)
    try:
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"refusing to load {path!r}: it needs unsafe unpickling "
                         f"(torch.load with weights_only=True failed: {first}).\n{UNSAFE_HINT}") from err
    for keys in nested:
        inner = obj
        for key in keys:
            inner = inner.get(key) if isinstance(inner, dict) else None
        if isinstance(inner, dict):
            obj = inner
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        top = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path!r} holds no state dict of tensors (top-level keys: {top}).\n{UNSAFE_HINT}")
    return obj


def block_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list:
    """Sorted indices N of keys ``{prefix}.N.*``."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def require(sd: Mapping[str, torch.Tensor], keys: Iterable[str], what: str) -> None:
    """One clear error naming the keys a checkpoint of kind ``what`` must have."""
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointMismatchError(
            f"not {what}: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}; its keys start with "
            f"{sorted(sd)[:8]}")


def check_against(expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor], source: str,
                  hint: str = "") -> None:
    """Raise one :class:`CheckpointMismatchError` naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if tuple(expected[k]) != tuple(given[k].shape))
    if not (missing or unexpected or shapes):
        return

    def show(keys, fmt=str):
        if not keys:
            return "none"
        return ", ".join(fmt(k) for k in keys[:10]) + (f" ... (+{len(keys) - 10} more)" if len(keys) > 10 else "")
    raise CheckpointMismatchError(
        f"{source} does not match the architecture it is converted to.\n"
        f"  missing keys: {show(missing)}\n  unexpected keys: {show(unexpected)}\n"
        f"  shape mismatches: {show(shapes, lambda k: f'{k} {tuple(given[k].shape)} vs {tuple(expected[k])}')}"
        + (f"\n{hint}" if hint else ""))


def expected_shapes(module: torch.nn.Module, prefix: str = "") -> Dict[str, torch.Size]:
    return {prefix + k: v.shape for k, v in module.state_dict().items()}


def repeat_blocks(shapes: Dict[str, torch.Size], depth: int, marker: str = "blocks.0.") -> Dict[str, torch.Size]:
    """Shapes of a model built with one block, extended to ``depth`` blocks (a d30 is never built just
    to learn its key names)."""
    out = {}
    for key, shape in shapes.items():
        if marker in key:
            for i in range(depth):
                out[key.replace(marker, marker.replace(".0.", f".{i}."), 1)] = shape
        else:
            out[key] = shape
    return out


def resolve_patch_nums(patch_nums: Optional[Sequence[int]], resolution: Optional[int], num_scales: int,
                       seq_len: Optional[int], default_resolution: Optional[int], source: str) -> Tuple[int, ...]:
    """The scales: given explicitly, by resolution, or read off the checkpoint (K scales from the level
    embedding, L tokens from an absolute position embedding)."""
    if patch_nums is not None and resolution is not None:
        raise ValueError("give either patch_nums or resolution, not both")
    if resolution is not None:
        if int(resolution) not in PATCH_NUMS:
            raise ValueError(f"resolution must be one of {sorted(PATCH_NUMS)} (or give patch_nums), got {resolution}")
        patch_nums = PATCH_NUMS[int(resolution)]
    if patch_nums is None:
        candidates = [pn for pn in PATCH_NUMS.values() if len(pn) == num_scales
                      and (seq_len is None or sum(p * p for p in pn) == seq_len)]
        if len(candidates) == 1:
            patch_nums = candidates[0]
        elif default_resolution is not None and PATCH_NUMS[default_resolution] in candidates:
            patch_nums = PATCH_NUMS[default_resolution]
        else:
            raise ValueError(f"{source}: cannot tell the scales from the weights ({num_scales} scales"
                             + (f", {seq_len} tokens" if seq_len else "") + "); pass --resolution 256|512|1024 "
                             "or --patch-nums 1,2,3,...")
    patch_nums = tuple(int(p) for p in patch_nums)
    if len(patch_nums) != num_scales:
        raise CheckpointMismatchError(f"{source} has {num_scales} scales (lvl_embed.weight has {num_scales} rows) "
                                      f"but patch_nums {patch_nums} has {len(patch_nums)}")
    if seq_len is not None and sum(p * p for p in patch_nums) != seq_len:
        raise CheckpointMismatchError(f"{source}: pos_1LC covers {seq_len} tokens but patch_nums {patch_nums} has "
                                      f"{sum(p * p for p in patch_nums)}")
    return patch_nums


def size_args(depth: int, width: int, num_heads: int) -> dict:
    from starkit.generator.transformer import SIZES
    name = next((n for n, s in SIZES.items() if s == dict(depth=depth, width=width, num_heads=num_heads)), "d16")
    return {"size": name, "depth": depth, "width": width, "num_heads": num_heads}


def write_generator_weights(path: str, tensors: Dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> None:
    """``generator.safetensors`` written atomically (floating tensors cast to ``dtype`` when given)."""
    out = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
           for k, v in tensors.items()}
    atomic_save_safetensors(path, out, metadata={"format": "pt"})


def write_model_config(model_dir: str, config: dict) -> None:
    from starkit.pipeline import FORMAT, FORMAT_VERSION
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    atomic_write_bytes(os.path.join(model_dir, "starkit.json"), json.dumps(config, indent=2).encode())


def check_vae_file(vae_path: str) -> None:
    """:class:`NotACheckpointError` naming a VQVAE file (not a ``.safetensors`` one) that cannot be a checkpoint."""
    if not vae_path.endswith(".safetensors"):
        check_checkpoint_file(vae_path, "a VQVAE checkpoint")


def write_tokenizer(vae_path: str, model_dir: str, patch_nums: Sequence[int], vocab_size: int, latent_dim: int) -> None:
    """Convert VAR's VQVAE file (or a tokenizer directory) into ``model_dir/tokenizer``."""
    from starkit.tokenizers import MultiScaleVQ
    check_vae_file(vae_path)
    tokenizer = MultiScaleVQ.from_pretrained(vae_path, patch_nums=list(patch_nums))
    if (tokenizer.codebook_size, tokenizer.embed_dim) != (vocab_size, latent_dim):
        raise CheckpointMismatchError(
            f"the VQVAE {vae_path!r} has a {tokenizer.codebook_size} x {tokenizer.embed_dim} codebook but the generator "
            f"expects {vocab_size} x {latent_dim} (head_logits.weight / word_embed.weight)")
    tokenizer.save_pretrained(os.path.join(model_dir, "tokenizer"))


def warn_once(message: str, category=UserWarning) -> None:
    warnings.warn(message, category, stacklevel=3)
