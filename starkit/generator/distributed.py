"""Multi-GPU helpers for ``ScaleWiseGenerator``: an FSDP strategy wrapped per block, EMA and
gradient clipping that are correct on sharded parameters, and the consolidation of an FSDP
sharded checkpoint directory into one file (``starkit export`` uses it).

DDP needs nothing from here (``trainer.strategy: ddp``): every rank holds the whole model,
gradients are all-reduced before clipping and the EMA update sees identical replicas.

FSDP (Lightning's ``FSDPStrategy``, i.e. FSDP1 with ``use_orig_params=True``) shards every
parameter. :class:`BlockFSDPStrategy` makes each transformer ``Block`` its own FSDP unit: the
blocks of ``transformer`` *and* of ``ema`` (a deep copy, same structure), so ``ema.blocks[i]``
and ``transformer.blocks[i]`` are sharded identically and their local shards can be lerped
pairwise. Everything else (embeddings, head, sampler, and the EMA's copies of them) lives in
the root unit, whose flat parameter mixes transformer and EMA tensors: :func:`ema_update`
gathers that unit alone (``summon_full_params(recurse=False)``: a few MB for d30) and
updates the blocks shard by shard. The frozen tokenizer and text encoder are left out of
FSDP (``ignored_modules``): replicated on every rank, never gathered, never in the optimizer.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable, List, Optional, Tuple

import torch
from lightning.pytorch.strategies import FSDPStrategy

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without FSDP / activation-checkpointing / compile wrapper segments."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def fsdp_root(module: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The FSDP-wrapped root of a LightningModule trained with an FSDP strategy, else None."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not isinstance(trainer.strategy, FSDPStrategy):
        return None
    return trainer.strategy.model


def _pairs(ema: torch.nn.Module, net: torch.nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    ema_p, cur_p = [], []
    ema_named, cur_named = list(ema.named_parameters()), list(net.named_parameters())
    if [clean_name(n) for n, _ in ema_named] != [clean_name(n) for n, _ in cur_named]:
        raise RuntimeError("EMA and transformer parameters do not correspond (different structures).")
    for (name, e), (_, c) in zip(ema_named, cur_named):
        if e.shape != c.shape:
            raise RuntimeError(f"EMA parameter {clean_name(name)} is sharded differently from the transformer's "
                               f"({tuple(e.shape)} vs {tuple(c.shape)}): wrap ema and transformer blocks alike "
                               f"(BlockFSDPStrategy) or keep both unsharded.")
        if e.numel():
            ema_p.append(e.detach() if e.requires_grad else e)
            cur_p.append(c.detach())
    return ema_p, cur_p


@torch.no_grad()
def ema_update(module: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * transformer`` on ``module.ema`` / ``module.transformer``.

    Unsharded (single device, DDP): one ``_foreach_lerp_`` over all parameters. FSDP: the root
    unit (non-block tensors of both) is gathered and written back; block parameters, which are
    1-D local shards laid out identically in ``ema.blocks[i]`` and ``transformer.blocks[i]``,
    are lerped shard by shard.
    """
    root = fsdp_root(module)
    if root is None:
        ema_p, cur_p = _pairs(module.ema, module.transformer)
        torch._foreach_lerp_(ema_p, cur_p, 1.0 - decay)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    with FSDP.summon_full_params(root, recurse=False, writeback=True):
        ema_p, cur_p = _pairs(module.ema, module.transformer)
        if ema_p:
            torch._foreach_lerp_(ema_p, cur_p, 1.0 - decay)


def clip_grad_norm(module: torch.nn.Module, params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip by the global norm; under FSDP through the root's ``clip_grad_norm_`` (the norm
    over all shards: ``torch.nn.utils.clip_grad_norm_`` would use each rank's local norm)."""
    root = fsdp_root(module)
    if root is not None:
        return root.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


def record_param_shapes(module: torch.nn.Module) -> None:
    """Remember every parameter's shape before a strategy shards it (idempotent; called from
    ``configure_model``, which Lightning runs before wrapping)."""
    if getattr(module, "_param_shapes", None) is None:
        module._param_shapes = {clean_name(n): tuple(p.shape) for n, p in module.named_parameters()}


def param_ndim(module: torch.nn.Module, prefix: str, name: str, param: torch.Tensor) -> int:
    """The original number of dimensions of ``module``'s parameter ``prefix + name`` (FSDP with
    ``use_orig_params`` shows 1-D local shards when the optimizer is configured)."""
    shapes = getattr(module, "_param_shapes", None) or {}
    return len(shapes.get(clean_name(prefix + name), param.shape))


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` set up for the generator, with YAML-friendly arguments.

    Args:
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2), ``HYBRID_SHARD``
            or ``NO_SHARD``.
        activation_checkpointing: recompute each ``Block`` in the backward (FSDP's checkpoint
            wrapper; prefer this to the model's own ``activation_checkpointing`` under FSDP).
        state_dict_type: ``sharded`` (a directory per checkpoint, each rank writes its shard;
            ``starkit export`` consolidates it) or ``full`` (one file gathered on rank 0).
        ignore_frozen: keep the frozen tokenizer and text encoder out of FSDP (replicated).
        cpu_offload: offload parameters and gradients to the CPU.
        **kwargs: other ``FSDPStrategy`` / ``FullyShardedDataParallel`` arguments.
    """

    def __init__(self, sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False,
                 state_dict_type: str = "sharded", ignore_frozen: bool = True, cpu_offload: bool = False,
                 **kwargs: Any) -> None:
        from starkit.generator.blocks import Block
        kwargs.setdefault("auto_wrap_policy", {Block})
        if activation_checkpointing:
            kwargs.setdefault("activation_checkpointing_policy", {Block})
        super().__init__(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                         cpu_offload=cpu_offload, **kwargs)
        self.ignore_frozen = ignore_frozen

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":
            raise ValueError("BlockFSDPStrategy (FSDP) needs CUDA GPUs (Lightning runs FSDP on GPUs only); on a CPU use "
                             "strategy: ddp, or strategy: auto for one process.")
        super().setup_environment()

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.ignore_frozen and "ignored_modules" not in self.kwargs:
            frozen = [getattr(model, name, None) for name in ("tokenizer", "text_encoder")]
            frozen = [m.to(self.root_device) for m in frozen if isinstance(m, torch.nn.Module)]
            self.kwargs["ignored_modules"] = frozen  # FSDP leaves them (and their device) alone
        return super()._setup_model(model)


def consolidate_checkpoint(path: str, out_file: Optional[str] = None) -> str:
    """An FSDP sharded checkpoint directory (``state_dict_type="sharded"``: ``*.distcp`` shards,
    ``.metadata`` and Lightning's ``meta.pt``) -> one ordinary Lightning checkpoint file.

    Runs in one process on the CPU (the whole model must fit in host memory). Returns the
    file written (``out_file``, default a temporary file).
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint
    from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint
    from pathlib import Path
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path!r} is a directory but not a sharded (torch.distributed.checkpoint) "
                                f"checkpoint: it has no .metadata file")
    checkpoint = _format_checkpoint(_load_distributed_checkpoint(Path(path)))
    if out_file is None:
        fd, out_file = tempfile.mkstemp(suffix=".ckpt", prefix="starkit-consolidated-")
        os.close(fd)
    torch.save(checkpoint, out_file)
    return out_file
