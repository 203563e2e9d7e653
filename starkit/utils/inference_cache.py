"""Values derived from parameters, computed once at inference and reused while the parameters are unchanged.

Generation calls every layer at every scale and sampler step: weights cast to the autocast dtype, bias
concatenations, clamped exponentials and the sampler head's revealed-token weight are derived once per version of
their parameters
(:func:`inference_cached`) instead of at every call. A version is the parameters' storage, autograd version
and optimizer-step count (fused optimizers write without raising the autograd version: a global step hook
counts them); :func:`clear_inference_caches` drops everything kept.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    """Global optimizer-step post-hook: marks every parameter the step may have changed. Fused and
    foreach optimizers write parameters without raising their autograd version counter, so the
    version alone would not show the update."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p._starkit_steps = getattr(p, "_starkit_steps", 0) + 1


register_optimizer_step_post_hook(_count_optimizer_step)
_CACHE_EPOCH = [0]  # raised by clear_inference_caches: what was cast before is gone


def version_key(tensors) -> Tuple:
    """Storage, version, optimizer steps, dtype and device of each tensor: changes when any is
    updated in place (an optimizer step, fused ones included; ``load_state_dict``), replaced or cast.
    Writes through ``.data`` are not seen: after one, call :func:`clear_inference_caches`."""
    return (_CACHE_EPOCH[0],) + tuple((t.data_ptr(), t._version, getattr(t, "_starkit_steps", 0), t.dtype, t.device)
                                      for t in tensors)


def weights_fingerprint(module: nn.Module) -> Tuple:
    """:func:`version_key` of every parameter and buffer of ``module``: changes when any is updated or replaced
    (what CUDA graphs captured from the module's weights are keyed on)."""
    return version_key(list(module.parameters()) + list(module.buffers()))


def inference_cached(module: nn.Module, name: str, params: Tuple[torch.Tensor, ...], build):
    """``build()``, computed once and reused while gradients are off and ``params`` are unchanged
    (same storage and version: an optimizer step, ``load_state_dict`` or ``.to()`` rebuilds it).
    Generation calls every layer at every scale: this saves the small kernels that only re-derive
    a parameter (bias concatenations, clamped exponentials). With gradients on, always ``build()``."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # compiled graphs derive it in the graph
        return build()
    key = version_key(params)
    cache = module.__dict__.setdefault("_inference_cache", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, build())
    return hit[1]


def autocast_dtype(x: torch.Tensor):
    """The autocast dtype of ``x``'s device when autocast is on there, else None."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def inference_param(module: nn.Module, name: str, params: Tuple[torch.Tensor, ...], build, x: torch.Tensor):
    """``build()`` (a tensor derived from ``params``), in the autocast dtype of ``x``'s device when autocast
    is on; while gradients are off it is built once per version of ``params`` and kept in ``module``.

    Autocast casts float32 weights at every call (its own cache is off while CUDA graphs are
    captured and does not outlive one ``autocast`` region): in generation that is a full read of
    the weights per scale and per sampler step. The cast copy costs its size in the autocast dtype."""
    if torch.is_grad_enabled():
        return build()
    dtype = autocast_dtype(x)
    return inference_cached(module, f"{name}:{dtype}", params, lambda: build() if dtype is None else build().to(dtype))


def clear_inference_caches(module: nn.Module) -> None:
    """Drop what :func:`inference_cached` keeps in ``module`` and its children (bias concatenations,
    weights cast to the autocast dtype): after validation, so that training does not carry a cast
    copy of the weights that the next optimizer step makes stale anyway. Raises the cache epoch in
    every :func:`version_key`, so CUDA graphs that read the dropped copies are captured again."""
    _CACHE_EPOCH[0] += 1
    for m in module.modules():
        m.__dict__.pop("_inference_cache", None)
