"""Guards that turn faults into one clear message instead of lost work.

- :class:`NonFiniteGuard`: a non-finite loss (or gradient) never reaches the weights.
  ``action="stop"`` ends training with an error naming the step, before the bad update,
  so every checkpoint on disk (``last.ckpt`` included) holds finite weights;
  ``action="skip"`` drops that batch's optimizer update and goes on.
- :func:`check_data_fits_model`: the data's image side must equal the tokenizer's
  ``patch_nums[-1] * downsample`` (checked by the ``starkit`` CLI before fit/validate/test).
- :func:`check_precision`: ``*-true`` precisions other than ``32-true`` cast every weight, the
  tokenizer's too, whose quantizer runs in float32: one clear error before the first step.
"""
from __future__ import annotations

import logging
import math
from typing import List, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient (``NonFiniteGuard(action="stop")``)."""


class NonFiniteGuard(L.Callback):
    """Stop, or skip the update, when the loss or a gradient is NaN or infinite.

    The check runs after the backward pass and before the optimizer step (and before
    gradient clipping): the losses of the step's backward passes and the gradients' float32
    norms (one multi-tensor kernel) with one host synchronisation per optimizer step. Skipping
    works by setting every gradient of the optimizer to ``None`` for that step: AdamW/SGD leave
    such parameters untouched (no update, no weight decay, no change to Adam's moments). The
    learning-rate scheduler still advances.
    With ``precision: 16-mixed`` the gradient scaler already skips overflowing steps, so
    only the loss is checked there.

    Args:
        action: "stop" raises :class:`NonFiniteLossError` naming the global step, before
            the bad update (no checkpoint with non-finite weights is ever written);
            "skip" skips the optimizer update of that batch and logs
            ``train/nonfinite_skipped`` (the running count).
        check_grads: also check the gradients (a finite loss can still give inf grads).
        max_consecutive_skips: with "skip", stop after this many faulty steps in a row
            (training that only produces NaN is not training).

    YAML::

        trainer:
          callbacks:
            - class_path: starkit.callbacks.NonFiniteGuard
              init_args: {action: skip}
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", check_grads: bool = True,
                 max_consecutive_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard: action must be 'stop' or 'skip', got {action!r}.")
        if max_consecutive_skips < 1:
            raise ValueError(f"NonFiniteGuard: max_consecutive_skips must be >= 1, got {max_consecutive_skips}.")
        self.action, self.check_grads, self.max_consecutive_skips = action, check_grads, max_consecutive_skips
        self.skipped = 0
        self._consecutive = 0
        self._losses: List[torch.Tensor] = []  # of the backward passes since the last optimizer step

    # ------------------------------------------------------------------ hooks
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().float().reshape(-1))  # checked at the optimizer step: no sync here

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses, self._losses = self._losses, []
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        checks, norms = [], None
        if losses:
            losses = torch.cat(losses)
            checks.append(torch.isfinite(losses).all())
        if self.check_grads and not _uses_grad_scaler(trainer) and params:
            norms = torch.stack(torch._foreach_norm([p.grad.detach() for p in params], 2, dtype=torch.float32))
            checks.append(torch.isfinite(norms).all())
        fault = None
        if checks and not bool(torch.stack(checks).all()):  # one host synchronisation per optimizer step
            if len(losses) and not bool(torch.isfinite(losses).all()):
                fault = f"the loss is {losses[~torch.isfinite(losses)][0].item()}"
            else:
                names = {id(p): n for n, p in pl_module.named_parameters()}
                bad = [names.get(id(p), "?") for p, n in zip(params, norms.tolist()) if not math.isfinite(n)]
                fault = f"{len(bad)} gradient(s) are not finite (first: {bad[0]})"
        if fault is None:
            self._consecutive = 0
            return
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx})"
        if self.action == "skip" and self._consecutive + 1 < self.max_consecutive_skips:
            for p in params:
                p.grad = None
            self.skipped += 1
            self._consecutive += 1
            rank_zero_warn(f"NonFiniteGuard: {fault} at {where}; skipped this optimizer update "
                           f"({self.skipped} skipped so far).")
            pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False,
                          batch_size=1, rank_zero_only=True)
            return
        for p in params:  # the bad update never happens, whatever catches the error
            p.grad = None
        trainer.should_stop = True
        reason = (f"{self._consecutive + 1} faulty steps in a row" if self.action == "skip" else fault)
        raise NonFiniteLossError(
            f"NonFiniteGuard: training stopped at {where}: {reason}. The weights were not updated with it, so the "
            f"last checkpoint on disk holds the last good weights; resume from it (--ckpt_path last) with a lower "
            f"learning rate, gradient clipping, or bf16/fp32 precision, or use NonFiniteGuard(action='skip').")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def _uses_grad_scaler(trainer) -> bool:
    plugin = getattr(trainer, "precision_plugin", None)
    return getattr(plugin, "scaler", None) is not None


# ---------------------------------------------------------------------- config checks
def data_resolution(datamodule) -> Optional[int]:
    """The image side a data module produces: its ``resolution`` attribute or hyperparameter."""
    if datamodule is None:
        return None
    value = getattr(datamodule, "resolution", None)
    if value is None:
        value = (getattr(datamodule, "hparams", None) or {}).get("resolution")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def check_data_fits_model(model, datamodule) -> None:
    """Raise one clear ``ValueError`` when the data's resolution does not fit the model's scales.

    ``model`` is a :class:`~starkit.tokenizers.ScaleTokenizer` (trained alone) or a module
    with a ``tokenizer`` (the generator; its ``patch_nums`` are the ones used). Models or
    data modules without these attributes (e.g. prompts for prediction) are not checked.
    """
    from starkit.tokenizers import ScaleTokenizer
    resolution = data_resolution(datamodule)
    if resolution is None:
        return
    tokenizer = model if isinstance(model, ScaleTokenizer) else getattr(model, "tokenizer", None)
    if not isinstance(tokenizer, ScaleTokenizer):
        return
    patch_nums = tuple(getattr(model, "patch_nums", None) or tokenizer.patch_nums)
    try:
        tokenizer.check_patch_nums(patch_nums, resolution)
    except ValueError as err:
        raise ValueError(f"{type(model).__name__} and {type(datamodule).__name__} do not fit: {err}") from None
    data_scales, data_codebook = getattr(datamodule, "patch_nums", None), getattr(datamodule, "codebook_size", None)
    if data_scales is not None and tuple(data_scales) != patch_nums:  # pre-tokenized data
        raise ValueError(f"{type(datamodule).__name__} holds tokens of the scales {tuple(data_scales)}, the model uses "
                         f"{patch_nums}: tokenize the data again with the model's patch_nums, or set them to the data's.")
    if data_codebook is not None and int(data_codebook) != tokenizer.codebook_size:
        raise ValueError(f"{type(datamodule).__name__} holds tokens of a {data_codebook}-code tokenizer, the model's "
                         f"has {tokenizer.codebook_size} codes: tokenize the data with the model's tokenizer.")


def check_precision(model) -> None:
    """Raise one clear ``ValueError`` when the trainer's precision casts the model's weights off float32
    (``bf16-true``, ``16-true``, ``64-true``): the tokenizer's quantizer (nearest codes, ``f_hat``) runs in
    float32 and would fail inside the first step on a dtype mismatch. Mixed precisions keep float32 weights."""
    trainer = getattr(model, "_trainer", None)
    precision = str(getattr(trainer, "precision", "") or "")
    if precision.endswith("-true") and precision != "32-true":
        raise ValueError(f"precision={precision!r} is not supported by {type(model).__name__}: it casts every weight, "
                         f"the tokenizer's too, whose quantizer runs in float32. Use precision: bf16-mixed (weights "
                         f"stay float32, the matrix products run in bf16), 16-mixed or 32-true.")
