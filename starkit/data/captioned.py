"""Captioned images for training: a folder of ``image + same-name .txt`` or a JSONL manifest.

Reading order: the index (scan or manifest) -> the split -> the dataset that never
crashes an epoch -> the LightningDataModule that ties them together.

A bad sample (undecodable, truncated, too large ...) is skipped inside
``__getitem__``: it is counted by cause and the next usable sample is returned instead.
Counts live in a small shared-memory tensor with one row per DataLoader worker, so they
add up across ``num_workers > 0``; each rank keeps its own.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from typing import Dict, List, Literal, Optional, Tuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    REPAIR_CAUSES,
    SKIP_CAUSES,
    CaptionedItem,
    SampleCounts,
    SampleError,
    load_sample,
    split_counts,
    var_transform,
)

CAUSES = SKIP_CAUSES + REPAIR_CAUSES


def scan_folder(root: str, missing_caption: str) -> Tuple[List[CaptionedItem], Counter, Counter]:
    """Find candidate images under ``root`` (recursively) and their ``.txt`` captions.

    Returns:
        The items sorted by key, the index counts (``skipped/missing_caption`` ...), and
        the count of every file extension seen (for error messages).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist or is not a folder")
    items, stats, extensions = [], Counter(), Counter()
    visited = set()  # real paths of the folders scanned: symlinked folders are followed, each folder once
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a link back up the tree, or a second link to the same folder
            dirs[:] = []
            continue
        visited.add(real)
        dirs.sort()
        names = set(files)
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            extensions[ext.lower() or "(none)"] += 1
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root).replace(os.sep, "/")
            caption_file = os.path.join(folder, stem + ".txt") if stem + ".txt" in names else None
            if caption_file is None:
                stats["missing_caption"] += 1
                if missing_caption == "skip":
                    continue
            items.append(CaptionedItem(image=path, key=key, caption_file=caption_file))
    items.sort(key=lambda item: item.key)
    return items, stats, extensions


def read_manifest(manifest: str, missing_caption: str) -> Tuple[List[CaptionedItem], Counter]:
    """Read a JSONL manifest of ``{"image": path, "caption": text}`` lines.

    Relative image paths are relative to the manifest's folder. Blank lines are ignored;
    lines that are not such an object are counted as ``bad_manifest_line`` and skipped.

    Returns:
        The items sorted by key, and the index counts.
    """
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest {manifest!r} does not exist")
    base = os.path.dirname(os.path.abspath(manifest))
    items, stats = [], Counter()
    with open(manifest, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8-sig"))
                image = record["image"]
                caption = record.get("caption")
                if not isinstance(image, str) or not (caption is None or isinstance(caption, str)):
                    raise TypeError("image and caption must be strings")
            except (ValueError, KeyError, TypeError, AttributeError):
                stats["bad_manifest_line"] += 1
                continue
            if caption is None:
                stats["missing_caption"] += 1
                if missing_caption == "skip":
                    continue
            key = image.replace("\\", "/")
            path = os.path.join(base, os.path.expanduser(image))
            items.append(CaptionedItem(image=path, key=key, caption=caption))
    items.sort(key=lambda item: item.key)
    return items, stats


def split_items(
    items: List[CaptionedItem], val_fraction: float, val_size: Optional[int], seed: int
) -> Tuple[List[CaptionedItem], List[CaptionedItem]]:
    """Deterministic train/val split: the ``n_val`` items with the smallest
    ``sha1(f"{seed}:{key}")`` go to validation, whatever the filesystem order. Adding
    files later moves no existing item from val to train unless it displaces it.
    """
    n = len(items)
    n_val = val_size if val_size is not None else round(val_fraction * n)
    if val_size is None and val_fraction > 0 and n > 1:
        n_val = max(n_val, 1)
    n_val = max(0, min(n_val, n - 1))

    def rank(i: int) -> str:
        return hashlib.sha1(f"{seed}:{items[i].key}".encode()).hexdigest()

    val_ids = set(sorted(range(n), key=rank)[:n_val])
    train = [item for i, item in enumerate(items) if i not in val_ids]
    val = [item for i, item in enumerate(items) if i in val_ids]
    return train, val


class CaptionedImageDataset(Dataset):
    """Map-style dataset of captioned images that never raises on a bad sample.

    A bad index is counted by cause and the next usable index, in order, is returned
    instead. Skips and repairs count only for the requested index, so one epoch counts
    each bad or repaired file once. Counts are kept in ``counts``, a shared-memory tensor of
    shape ``(num_workers + 1, len(CAUSES))``: row 0 is the main process, row ``k + 1``
    DataLoader worker ``k``. :attr:`stats` sums them.

    Args:
        items: The samples, e.g. from :func:`scan_folder` or :func:`read_manifest`.
        resolution: Output side ``R``.
        train: Random crop if ``True``, centre crop otherwise.
        max_image_pixels: Decompression-bomb limit in pixels (``None``: no limit).
        min_size_policy: ``"upscale"`` or ``"skip"`` images whose short side is < ``R``.
        missing_caption: ``"empty"`` (use ``""``) or ``"skip"``.
        num_workers: DataLoader workers that will read it (sizes ``counts``).
    """

    def __init__(
        self,
        items: List[CaptionedItem],
        resolution: int = 256,
        train: bool = True,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
        min_size_policy: str = "upscale",
        missing_caption: str = "empty",
        num_workers: int = 0,
    ):
        self.items = items
        self.resolution = resolution
        self.max_image_pixels = max_image_pixels
        self.min_size_policy = min_size_policy
        self.missing_caption = missing_caption
        self.transform = var_transform(resolution, train)
        self.counts = SampleCounts(CAUSES, num_workers)
        self._bad: Dict[int, str] = {}  # per process: index -> cause, not reloaded twice

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        n = len(self.items)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                if step == 0:
                    self.counts.count(self._bad[j], self.items[j].image, "")
                continue
            repairs: List[str] = []
            try:
                sample = load_sample(
                    self.items[j], self.resolution, self.max_image_pixels,
                    self.min_size_policy, self.missing_caption, self.transform, repairs,
                )
            except SampleError as err:
                self._bad[j] = err.cause
                if step == 0:  # count only the requested index: one count per bad file per epoch
                    self.counts.count(err.cause, self.items[j].image, err.detail)
                continue
            for cause in repairs if step == 0 else ():  # a stand-in counts when requested itself
                self.counts.count(cause, self.items[j].image, "")
            return sample
        raise RuntimeError(f"none of the {n} samples of this dataset can be loaded; see the warnings")

    @property
    def stats(self) -> Dict[str, Dict[str, int]]:
        """Counts by cause, summed over workers: ``{"skipped": {...}, "repaired": {...}}``."""
        return self.counts.stats()


class CaptionedImageDataModule(L.LightningDataModule):
    """Captioned images for ``fit``: batches ``{"image": (B, 3, R, R) in [-1, 1],
    "caption": list[str], "path": list[str]}``.

    Give exactly one of ``root`` or ``manifest``. Bad files never stop training: they
    are skipped or repaired and counted (see :meth:`skipped_counts`). A source with no
    images, or whose first ``probe_count`` images are all unusable, is one clear error
    at ``setup``.

    Args:
        root: Folder of images (searched recursively) with same-name ``.txt`` captions.
        manifest: JSONL file, one ``{"image": path, "caption": text}`` per line; relative
            paths are relative to the manifest's folder.
        resolution: Side ``R`` of the square training images.
        batch_size: Images per batch (per device).
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of the images held out for validation (at least one
            when > 0 and there are two or more images).
        val_size: Exact number of validation images; overrides ``val_fraction``.
        seed: Seed of the train/val split (which does not depend on filesystem order).
        missing_caption: ``"empty"``: use ``""`` and count it; ``"skip"``: drop the image.
        max_image_pixels: Images with more pixels (width * height) are skipped unread,
            as decompression bombs.
        min_size_policy: For images whose short side is < ``resolution``: ``"upscale"``
            (count and use) or ``"skip"``.
        probe_count: How many images ``setup`` decodes to check that the source is usable.
        pin_memory: Pin batches in page-locked memory (only when CUDA is available).
        persistent_workers: Keep workers alive between epochs (when ``num_workers > 0``).
    """

    def __init__(
        self,
        root: Optional[str] = None,
        manifest: Optional[str] = None,
        resolution: int = 256,
        batch_size: int = 16,
        num_workers: int = 4,
        val_fraction: float = 0.01,
        val_size: Optional[int] = None,
        seed: int = 0,
        missing_caption: Literal["empty", "skip"] = "empty",
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
        min_size_policy: Literal["upscale", "skip"] = "upscale",
        probe_count: int = 16,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ):
        super().__init__()
        if (root is None) == (manifest is None):
            raise ValueError("give exactly one of `root` (a folder) or `manifest` (a JSONL file)")
        if missing_caption not in ("empty", "skip"):
            raise ValueError(f"missing_caption must be 'empty' or 'skip', got {missing_caption!r}")
        if min_size_policy not in ("upscale", "skip"):
            raise ValueError(f"min_size_policy must be 'upscale' or 'skip', got {min_size_policy!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.root, self.manifest = root, manifest
        self.resolution, self.batch_size, self.num_workers = resolution, batch_size, num_workers
        self.val_fraction, self.val_size, self.seed = val_fraction, val_size, seed
        self.missing_caption, self.min_size_policy = missing_caption, min_size_policy
        self.max_image_pixels, self.probe_count = max_image_pixels, probe_count
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.index_stats: Counter = Counter()
        self.train_dataset: Optional[CaptionedImageDataset] = None
        self.val_dataset: Optional[CaptionedImageDataset] = None

    @property
    def source(self) -> str:
        """The folder or manifest this module reads."""
        return self.root if self.root is not None else self.manifest

    def setup(self, stage: Optional[str] = None) -> None:
        """Index, probe and split the images (once), then build the datasets."""
        if self.train_dataset is not None:
            return
        if self.root is not None:
            items, self.index_stats, extensions = scan_folder(self.root, self.missing_caption)
            if not items:
                seen = ", ".join(f"{e} x {n}" for e, n in extensions.most_common(8)) or "no files"
                hint = " (all lacked a caption and missing_caption='skip')" if self.index_stats else ""
                raise FileNotFoundError(
                    f"no images found in folder {self.root!r}{hint}: looked for "
                    f"{', '.join(IMAGE_EXTENSIONS)} (any case), found {seen}"
                )
        else:
            items, self.index_stats = read_manifest(self.manifest, self.missing_caption)
            if not items:
                raise ValueError(f"manifest {self.manifest!r} lists no usable images ({dict(self.index_stats)})")
        for cause, n in sorted(self.index_stats.items()):
            if cause == "missing_caption" and self.missing_caption == "empty":
                what = f"{n} image(s) have no caption; using ''"
            else:
                what = f"skipped {n} {'image(s)' if cause == 'missing_caption' else 'line(s)'}: {cause}"
            rank_zero_warn(f"starkit.data: {self.source!r}: {what}")
        self._probe(items)
        train, val = split_items(items, self.val_fraction, self.val_size, self.seed)
        kwargs = dict(
            resolution=self.resolution, max_image_pixels=self.max_image_pixels,
            min_size_policy=self.min_size_policy, missing_caption=self.missing_caption,
            num_workers=self.num_workers,
        )
        self.train_dataset = CaptionedImageDataset(train, train=True, **kwargs)
        self.val_dataset = CaptionedImageDataset(val, train=False, **kwargs)

    def _probe(self, items: List[CaptionedItem]) -> None:
        """Raise one clear error if none of the first ``probe_count`` items is usable."""
        failures: Counter = Counter()
        example = ""
        for item in items[: max(1, self.probe_count)]:
            try:
                load_sample(item, self.resolution, self.max_image_pixels, self.min_size_policy,
                            self.missing_caption, None, [])
                return
            except SampleError as err:
                failures[err.cause] += 1
                example = example or str(err)
        found = ", ".join(f"{cause} x {n}" for cause, n in failures.most_common())
        raise RuntimeError(
            f"none of the first {sum(failures.values())} of {len(items)} candidate images in "
            f"{self.source!r} can be used ({found}); for example {example}"
        )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        if shuffle:  # training: resumes mid-epoch at the same sample (starkit.utils.resumable)
            from starkit.utils.resumable import ResumableDataLoader
            return ResumableDataLoader(
                dataset, shuffle=True, seed=self.seed, batch_size=self.batch_size, num_workers=self.num_workers,
                pin_memory=self.pin_memory and torch.cuda.is_available(),
                persistent_workers=self.persistent_workers and self.num_workers > 0)
        from starkit.utils.resumable import evaluation_generator
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=evaluation_generator(self.seed),  # validation leaves the global random state alone
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches with random crops."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self):
        """Batches with centre crops, in a fixed order; ``[]`` when no images are held out."""
        return self._loader(self.val_dataset, shuffle=False) if len(self.val_dataset) else []

    def skipped_counts(self) -> Dict[str, int]:
        """Non-zero counts of skipped and repaired samples on this rank, e.g.
        ``{"index/missing_caption": 2, "train/skipped/undecodable": 3}``.

        Runtime counts add up over DataLoader workers and epochs (a bad file counts once
        each time it is requested); index counts are from the scan at ``setup``. A
        LightningModule can log them with ``self.log_dict(dm.skipped_counts())``.
        """
        out = {f"index/{cause}": int(n) for cause, n in sorted(self.index_stats.items()) if n}
        out.update(split_counts({"train": self.train_dataset, "val": self.val_dataset}))
        return out

    def teardown(self, stage: Optional[str] = None) -> None:
        """Warn (rank zero) with a summary of what was skipped or repaired."""
        counts = self.skipped_counts()
        if counts:
            summary = ", ".join(f"{k}={v}" for k, v in counts.items())
            rank_zero_warn(f"starkit.data: bad-sample summary for {self.source!r}: {summary}")
