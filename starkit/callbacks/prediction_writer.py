"""``ImageWriter``: one PNG per generated image plus a JSON sidecar; never overwrites."""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from starkit.utils.io import atomic_save_image, atomic_write_bytes, images_to_pil


class ImageWriter(BasePredictionWriter):
    """Writes ``<output_dir>/<name>.png`` and ``<name>.json`` (prompt, seed, settings,
    checkpoint) for every predicted image.

    Files are written atomically (temporary file, then rename), the JSON first and the PNG
    last, so an image that exists is complete; an existing image is never overwritten, so a
    rerun of an interrupted prediction writes only the missing ones.

    Args:
        output_dir: folder of the images (created if needed). None: the data module's ``output_dir``
            (``PromptDataModule(output_dir=...)``, the folder its resume check reads), else "outputs".
            Given both, they must be the same folder.
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.written = 0
        self.skipped = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data_dir = getattr(getattr(getattr(trainer, "datamodule", None), "dataset", None), "output_dir", None)
        if self.output_dir is None:
            self.output_dir = data_dir or "outputs"
        elif data_dir is not None and os.path.normpath(data_dir) != os.path.normpath(self.output_dir):
            raise ValueError(f"ImageWriter writes to {self.output_dir!r} but the data module skips the images that exist "
                             f"in {data_dir!r}: set one folder (ImageWriter's output_dir can be left out: it then "
                             f"uses the data module's).")
        if stage == "predict":  # an unusable folder is found now, not after the first batch was generated
            fix = "Set output_dir to a folder you can write to (predict recipes: --data.init_args.output_dir DIR)."
            if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
                raise NotADirectoryError(f"ImageWriter's output folder {self.output_dir!r} is a file, not a folder. "
                                         f"{fix}")
            try:
                os.makedirs(self.output_dir, exist_ok=True)
                writable = os.access(self.output_dir, os.W_OK | os.X_OK)
            except OSError as err:
                raise type(err)(f"ImageWriter cannot use the output folder {self.output_dir!r}: "
                                f"{err.strerror or err}. {fix}") from err
            if not writable:
                raise PermissionError(f"ImageWriter cannot write into the output folder {self.output_dir!r} (no "
                                      f"write permission). {fix}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written, self.skipped = 0, 0

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.utilities import rank_zero_info
        skipped = f"; {self.skipped} already existed and were kept" if self.skipped else ""
        rank_zero_info(f"ImageWriter: {self.written} images written to {self.output_dir!r}{skipped}")

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        names = prediction.get("name") or [f"{batch_idx:06d}_{i:02d}" for i in range(len(prediction["prompt"]))]
        ckpt = getattr(trainer, "ckpt_path", None)
        for i, (image, name) in enumerate(zip(images_to_pil(prediction["images"]), names)):
            png = os.path.join(self.output_dir, f"{name}.png")
            if os.path.exists(png):
                self.skipped += 1
                continue
            meta = {"prompt": prediction["prompt"][i], "seed": prediction["seed"][i],
                    "settings": prediction.get("settings"), "checkpoint": str(ckpt) if ckpt else None,
                    "model": type(pl_module).__name__}
            atomic_write_bytes(os.path.join(self.output_dir, f"{name}.json"),
                               json.dumps(meta, indent=2, default=str).encode())
            if atomic_save_image(png, image, overwrite=False):
                self.written += 1
            else:
                self.skipped += 1
