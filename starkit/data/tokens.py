"""Pre-tokenized training data: the K index maps of each image, computed once.

The generator's training step tokenizes every image with the frozen VQ tokenizer; at d16
@256 on an H200 that is about a quarter of the step (docs/performance.md). Tokenizing the
data set once removes it, at the price of a fixed crop per image (the centre crop of the
validation transform, as VAR's and STAR's token-caching reproductions do):

    starkit tokenize --tokenizer checkpoints/vae_ch160v4096z32.pth \\
        --root data/images --resolution 256 --out data/tokens256

writes ``<out>/indices.npy`` (N, L) uint16 (L = sum of pn^2, row-major per scale, scale
after scale), ``<out>/captions.jsonl`` (one ``{"caption", "path"}`` per row) and
``<out>/meta.json`` (patch_nums, codebook size, resolution, count, tokenizer). A
:class:`TokenizedDataModule` serves batches ``{"indices": (B, L) long, "caption": [...]}``,
which :class:`~starkit.generator.ScaleWiseGenerator` trains on without its VQ encoder.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import List, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from starkit.utils.io import atomic_write_bytes

FORMAT = "starkit-tokens-1"


def tokenize_dataset(tokenizer, dataset: Dataset, out_dir: str, batch_size: int = 32, num_workers: int = 4,
                     device: Optional[str] = None, description: str = "") -> dict:
    """Encode every sample of ``dataset`` (items with ``image`` (3, R, R) in [-1, 1] and ``caption``)
    with ``tokenizer`` and write the files of the module docstring to ``out_dir``. Returns the meta.

    On CUDA the encoder runs under bf16 autocast (the generator's training step does the same). The
    tokenizer is moved to ``device`` and put in eval mode. On an error no partial file is left."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to tokenize (check the folder or manifest).")
    if tokenizer.codebook_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"codebook_size {tokenizer.codebook_size} does not fit uint16 token files (max 65536).")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = tokenizer.to(device).eval()
    patch_nums = [int(p) for p in tokenizer.patch_nums]
    length = sum(p * p for p in patch_nums)
    os.makedirs(out_dir, exist_ok=True)
    partial = os.path.join(out_dir, "indices.npy.partial")
    rows = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint16, shape=(len(dataset), length))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    start, resolution = 0, None
    partial_captions = os.path.join(out_dir, "captions.jsonl.partial")
    try:
        with open(partial_captions, "w") as captions, torch.no_grad(), autocast:
            for batch in loader:
                images = batch["image"].to(device, non_blocking=True)  # (B, 3, R, R)
                resolution = int(images.shape[-1])
                indices = torch.cat(tokenizer.encode(images), dim=1)  # (B, L)
                rows[start:start + len(indices)] = indices.cpu().numpy().astype(np.uint16)
                paths = batch.get("path") or [""] * len(indices)
                for caption, path in zip(batch["caption"], paths):
                    captions.write(json.dumps({"caption": caption, "path": str(path)}) + "\n")
                start += len(indices)
        rows.flush()
    except BaseException:
        del rows
        for path in (partial, partial_captions):
            if os.path.exists(path):
                os.remove(path)
        raise
    del rows
    meta = {"format": FORMAT, "patch_nums": patch_nums, "codebook_size": int(tokenizer.codebook_size),
            "resolution": resolution, "count": start, "length": length, "tokenizer": description}
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):  # an older run's meta must not describe the new rows if we stop half-way
        os.remove(meta_path)
    os.replace(partial, os.path.join(out_dir, "indices.npy"))  # complete files only under the final names
    os.replace(os.path.join(out_dir, "captions.jsonl.partial"), os.path.join(out_dir, "captions.jsonl"))
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())  # last: a folder with meta.json is complete
    return meta


def read_meta(root: str) -> dict:
    """``meta.json`` of a token folder, with one clear error when the folder is not one."""
    path = os.path.join(root, "meta.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(root, "indices.npy")):
        raise FileNotFoundError(f"{root!r} is not a token folder (no meta.json / indices.npy): write one with "
                                f"`starkit tokenize --out {root} ...`.")
    with open(path) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this starkit reads {FORMAT!r}.")
    return meta


class TokenizedDataset(Dataset):
    """Rows of a token folder: ``{"indices": (L,) long, "caption": str}`` (the file is memory-mapped).

    Args:
        root: the folder written by :func:`tokenize_dataset`.
        rows: the row numbers to serve (default: all).
    """

    def __init__(self, root: str, rows: Optional[Sequence[int]] = None) -> None:
        self.root, self.meta = root, read_meta(root)
        with open(os.path.join(root, "captions.jsonl")) as fh:
            self.captions: List[str] = [json.loads(line)["caption"] for line in fh if line.strip()]
        count = len(self.token_rows)
        shape, expected = tuple(self.token_rows.shape), (self.meta.get("count"), self.meta.get("length"))
        if shape != expected:
            raise ValueError(f"{root}: indices.npy holds {shape} token rows but meta.json describes {expected} "
                             f"(count, length); the files are from different runs: write the folder again.")
        if len(self.captions) != count:
            raise ValueError(f"{root}: {count} token rows but {len(self.captions)} captions; "
                             f"the folder is incomplete: write it again.")
        self.rows = list(range(count)) if rows is None else list(rows)

    @property
    def token_rows(self) -> np.ndarray:
        """The memory-mapped ``(N, L)`` uint16 rows, opened on first use in each process."""
        if getattr(self, "_token_rows", None) is None:
            self._token_rows = np.load(os.path.join(self.root, "indices.npy"), mmap_mode="r")
        return self._token_rows

    def __getstate__(self) -> dict:  # DataLoader workers (spawn) reopen the file instead of receiving a copy
        return {**self.__dict__, "_token_rows": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"indices": torch.from_numpy(self.token_rows[row].astype(np.int64)), "caption": self.captions[row]}


class TokenizedDataModule(L.LightningDataModule):
    """Training data from a token folder (:func:`tokenize_dataset`): batches ``{"indices": (B, L) long,
    "caption": list of str}``; the generator then skips its VQ encoding.

    Args:
        root: the token folder.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        val_size: rows held out for validation (a fixed, seeded choice).
        seed: seed of the split and of the training order.
    """

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 2, val_size: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root, self.batch_size, self.num_workers, self.val_size, self.seed = root, batch_size, num_workers, \
            val_size, seed
        self.meta = read_meta(root)
        self.resolution = self.meta["resolution"]  # checked against the generator's scales before fitting
        self.patch_nums = tuple(self.meta["patch_nums"])  # ... and so are these and the codebook size
        self.codebook_size = int(self.meta["codebook_size"])
        self.train_dataset = self.val_dataset = None

    def setup(self, stage: Optional[str] = None) -> None:
        count = self.meta["count"]
        if not 0 <= self.val_size < count:
            raise ValueError(f"val_size={self.val_size} must be in [0, {count}) for {self.root} ({count} rows).")
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_dataset = TokenizedDataset(self.root, sorted(order[:self.val_size]))
        self.train_dataset = TokenizedDataset(self.root, sorted(order[self.val_size:]))

    def train_dataloader(self) -> DataLoader:
        from starkit.utils.resumable import ResumableDataLoader
        return ResumableDataLoader(self.train_dataset, shuffle=True, seed=self.seed, batch_size=self.batch_size,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        if not len(self.val_dataset):
            return []
        from starkit.utils.resumable import evaluation_generator
        return DataLoader(self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          generator=evaluation_generator(self.seed))  # leaves the global random state alone


def main(argv=None) -> None:
    """``starkit tokenize``: tokenize a captioned image folder or manifest (centre crops)."""
    from starkit.data.captioned import CaptionedImageDataset, read_manifest, scan_folder
    from starkit.tokenizers import MultiScaleVQ
    ap = argparse.ArgumentParser(prog="starkit tokenize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="VAR's vae_ch160v4096z32.pth or a starkit tokenizer folder")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="folder of images with same-name .txt captions")
    src.add_argument("--manifest", help='JSONL of {"image": path, "caption": text}')
    ap.add_argument("--resolution", type=int, default=256,
                    help="side of the centre crop in pixels (default: %(default)s); the tokenizer's last scale times "
                         "its downsampling factor")
    ap.add_argument("--patch-nums", default=None, help="comma list of scales (default: the tokenizer's)")
    ap.add_argument("--out", required=True, help="output folder of the token rows and their metadata")
    ap.add_argument("--batch-size", type=int, default=32, help="images per encoding batch (default: %(default)s)")
    ap.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="image-decoding worker processes (default: min(4, CPU cores) = %(default)s)")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available, else cpu)")
    args = ap.parse_args(argv)
    tokenizer = MultiScaleVQ.from_pretrained(args.tokenizer)
    if args.patch_nums:
        patch_nums = [int(p) for p in args.patch_nums.split(",")]
        tokenizer.check_patch_nums(patch_nums, args.resolution)
        tokenizer.set_patch_nums(patch_nums)
    tokenizer.check_patch_nums(tokenizer.patch_nums, args.resolution)
    items = scan_folder(args.root, "empty")[0] if args.root else read_manifest(args.manifest, "empty")[0]
    dataset = CaptionedImageDataset(items, resolution=args.resolution, train=False, num_workers=args.num_workers)
    meta = tokenize_dataset(tokenizer, dataset, args.out, args.batch_size, args.num_workers, args.device,
                            description=os.path.abspath(args.tokenizer))
    skipped = dataset.stats.get("skipped", {})
    print(f"wrote {meta['count']} rows of {meta['length']} tokens to {args.out}"
          + (f" (skipped or replaced: {skipped})" if skipped else ""))
