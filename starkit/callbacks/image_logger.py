"""``ImageGridLogger``: generates a fixed grid of prompts at the end of validation."""
from __future__ import annotations

import os
from typing import List, Optional

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from starkit.utils.io import images_to_pil

DEFAULT_PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle",
                   "a purple star", "a photo of a cat", "a mountain lake at sunset"]


def make_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """``(N, 3, H, W)`` -> one ``(3, rows*H, nrow*W)`` grid (no torchvision needed)."""
    N, C, H, W = images.shape
    rows = (N + nrow - 1) // nrow
    grid = images.new_zeros(C, rows * H, nrow * W)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = images[i]
    return grid


class ImageGridLogger(L.Callback):
    """Logs images of fixed prompts (and seed) after each validation epoch.

    TensorBoard gets an image; other loggers (or none) get PNG files under
    ``<log_dir>/samples/step_<N>.png``.

    Args:
        prompts: prompts of the grid (one image each).
        seed: sampling seed, fixed so grids are comparable across steps.
        every_n_epochs: log every N validation epochs.
        nrow: images per row.
    """

    def __init__(self, prompts: Optional[List[str]] = None, seed: int = 0, every_n_epochs: int = 1,
                 nrow: int = 4) -> None:
        super().__init__()
        self.prompts = list(prompts or DEFAULT_PROMPTS)
        self.seed, self.every_n_epochs, self.nrow = seed, every_n_epochs, nrow

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch % self.every_n_epochs):
            return
        was_training = pl_module.training
        pl_module.eval()
        with trainer.precision_plugin.forward_context():
            images = pl_module.generate(self.prompts, seed=self.seed)
        pl_module.train(was_training)
        grid = make_grid(images.float().cpu(), self.nrow)
        step = trainer.global_step
        logger = trainer.logger
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image("samples", grid, global_step=step)
            return
        # not trainer.log_dir: it broadcasts, and this hook runs on rank 0 alone (DDP would hang)
        log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
        folder = os.path.join(log_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        images_to_pil(grid[None])[0].save(os.path.join(folder, f"step_{step:07d}.png"))
