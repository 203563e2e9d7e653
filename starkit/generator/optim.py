"""The generator's optimizer and learning-rate schedule (VAR / STAR): AdamW without weight decay on
1-D parameters and on the module's named exceptions, linear warm-up then linear decay per step."""
from __future__ import annotations

from typing import Callable

import torch


def adamw_with_warmup_decay(module, trained: torch.nn.Module, prefix: str, fused: bool) -> dict:
    """Lightning's ``configure_optimizers`` dict for ``trained`` (a submodule of ``module`` under
    ``prefix``), with ``module.hparams``' lr, betas, weight_decay, warmup_steps and final_lr_ratio.

    No weight decay on parameters of fewer than 2 dimensions (measured before FSDP flattening) and on
    the names ``trained.no_weight_decay()`` returns (start token, level and position embeddings)."""
    from starkit.generator.distributed import clean_name, param_ndim
    hp = module.hparams
    no_decay_names = set(getattr(trained, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in trained.named_parameters():
        if not p.requires_grad:
            continue
        small = param_ndim(module, prefix, name, p) < 2 or clean_name(name) in no_decay_names
        (no_decay if small else decay).append(p)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
    total = module.trainer.estimated_stepping_batches if module._trainer else 1
    if total == float("inf"):
        raise ValueError("The learning-rate schedule decays linearly to the last optimizer step, but this run has no "
                         "known length (max_steps=-1 with an unsized or endless data loader, or max_epochs=-1): set "
                         "trainer.max_steps.")
    total = max(int(total), 1)
    schedule = warmup_linear_decay(hp.warmup_steps, total, hp.final_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_linear_decay(warmup_steps: int, total_steps: int, final_ratio: float) -> Callable[[int], float]:
    """LR multiplier of optimizer step ``step`` (0-based) of ``total_steps``: linear warm-up to 1 over
    ``warmup_steps``, then linear decay, reaching ``final_ratio`` at the last step (``total_steps - 1``)."""
    def schedule(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(total_steps - 1 - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return 1.0 - (1.0 - final_ratio) * progress
    return schedule
