"""``GridWriter``: one grid PNG of the images predicted in a ``starkit predict`` run."""
from __future__ import annotations

import math
import os
from typing import Any, List, Optional

import lightning as L
import torch

from starkit.utils.io import atomic_save_image, images_to_pil


class GridWriter(L.Callback):
    """Collects the images of every predict batch and writes them as one grid PNG at the end.

    Use it next to :class:`~starkit.callbacks.ImageWriter` (which writes one PNG per image).
    Only the images generated in this run are in the grid (a resumed run that skipped
    existing images shows the new ones); with several devices each rank writes its own
    images, rank ``r > 0`` to ``<stem>_rank<r>.png``.

    Args:
        path: the grid's file. None: next to the ImageWriter's folder,
            ``<output_dir>_grid.png`` (e.g. ``outputs/demo_grid.png``), else
            ``<default_root_dir>/predictions_grid.png``.
        nrow: images per row (None: the data's ``num_images_per_prompt`` when it is above 1,
            so each row is one prompt, else about the square root of the count).
        max_images: keep at most this many images (the first ones).
        padding: pixels between images.
        pad_value: grey level of the padding (0-255).
    """

    def __init__(self, path: Optional[str] = None, nrow: Optional[int] = None, max_images: int = 256,
                 padding: int = 2, pad_value: int = 255) -> None:
        super().__init__()
        self.path, self.nrow, self.max_images = path, nrow, max_images
        self.padding, self.pad_value = padding, pad_value
        self._images: List[torch.Tensor] = []
        self.written: Optional[str] = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images, self.written = [], None

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        images = outputs.get("images") if isinstance(outputs, dict) else outputs
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            return
        have = sum(x.shape[0] for x in self._images)
        if have < self.max_images:
            self._images.append(images[: self.max_images - have].detach().cpu())

    def _target(self, trainer: L.Trainer) -> str:
        path = self.path
        if path is None:
            from starkit.callbacks.prediction_writer import ImageWriter
            writers = [cb for cb in trainer.callbacks if isinstance(cb, ImageWriter)]
            if writers:
                path = os.path.normpath(writers[0].output_dir) + "_grid.png"
            else:
                path = os.path.join(trainer.default_root_dir, "predictions_grid.png")
        if trainer.global_rank > 0:
            stem, ext = os.path.splitext(path)
            path = f"{stem}_rank{trainer.global_rank}{ext or '.png'}"
        return path

    def _nrow(self, trainer: L.Trainer, n: int) -> int:
        if self.nrow:
            return self.nrow
        per_prompt = getattr(getattr(trainer, "datamodule", None), "num_images_per_prompt", None)
        if isinstance(per_prompt, int) and 1 < per_prompt <= n:
            return per_prompt
        return max(1, math.ceil(math.sqrt(n)))

    def grid(self, images: torch.Tensor, nrow: int) -> torch.Tensor:
        """``(N, 3, H, W)`` uint8 (or floats in [0, 1]) -> ``(3, H', W')`` uint8 grid with padding."""
        if images.dtype != torch.uint8:
            images = images.float().clamp(0, 1).mul(255).round().to(torch.uint8)
        N, C, H, W = images.shape
        rows, p = math.ceil(N / nrow), self.padding
        grid = torch.full((C, rows * (H + p) + p, nrow * (W + p) + p), self.pad_value, dtype=torch.uint8)
        for i in range(N):
            r, c = divmod(i, nrow)
            y, x = p + r * (H + p), p + c * (W + p)
            grid[:, y:y + H, x:x + W] = images[i]
        return grid

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._images:
            return
        images = torch.cat(self._images)
        grid = self.grid(images, self._nrow(trainer, images.shape[0]))
        path = self._target(trainer)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_save_image(path, images_to_pil(grid[None])[0], overwrite=True)
        self.written = path
        self._images = []
