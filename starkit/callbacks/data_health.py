"""``DataHealthLogger``: the skipped and repaired sample counts, logged during training."""
from __future__ import annotations

from typing import Dict, Optional

import lightning as L


class DataHealthLogger(L.Callback):
    """Log the data module's ``skipped_counts()`` as ``data/<key>`` metrics.

    A data module that skips or repairs bad samples instead of failing (e.g.
    ``starkit.data.CaptionedImageDataModule``) counts them by cause; this callback
    logs those counts (``data/train/skipped/undecodable``, ``data/index/missing_caption``
    ...) plus the totals ``data/skipped_total`` and ``data/repaired_total``, at the end of
    every training epoch and, with ``every_n_steps``, every N optimizer steps. Data modules
    without ``skipped_counts()`` (e.g. the shapes world) log nothing. Counts are summed
    over ranks. Works for any LightningModule (generator, tokenizer).

    In YAML: ``trainer.callbacks: [{class_path: starkit.callbacks.DataHealthLogger, init_args: {every_n_steps:
    100}}]``.

    Args:
        every_n_steps: also log every N training steps (None: only at epoch end).
    """

    def __init__(self, every_n_steps: Optional[int] = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"DataHealthLogger: every_n_steps must be >= 1 or None, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self._last_step = -1

    @staticmethod
    def counts(trainer) -> Optional[Dict[str, float]]:
        """``{"data/<key>": count}`` with totals, or None when the data module keeps no counts."""
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not callable(getattr(dm, "skipped_counts", None)):
            return None
        raw = dm.skipped_counts()
        out = {f"data/{k}": float(v) for k, v in raw.items()}
        out["data/skipped_total"] = float(sum(v for k, v in raw.items() if "/skipped/" in k or k.startswith("index/")))
        out["data/repaired_total"] = float(sum(v for k, v in raw.items() if "/repaired/" in k))
        return out

    def _log(self, trainer, pl_module, on_step: bool) -> None:
        counts = self.counts(trainer)
        if counts is None:
            return
        for key, value in counts.items():
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, reduce_fx="sum",
                          sync_dist=trainer.world_size > 1, batch_size=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step != self._last_step and step % self.every_n_steps == 0:
            self._last_step = step
            self._log(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, on_step=False)
