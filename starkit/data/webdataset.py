"""Captioned images in WebDataset tar shards (the layout img2dataset writes), streamed.

A shard is a tar file whose members are grouped by *key*: ``000000000.jpg``,
``000000000.txt`` (caption), optional ``000000000.json``, then the next key. The caption is
the ``.txt`` member, else a ``.caption`` member, else the ``"caption"`` (or ``"text"``,
``"prompt"``) string of the ``.json`` member. Shards are
given as a brace pattern (``data/{00000..00099}.tar``), a glob (``data/*.tar``) or a list.

Reading order, one *pass* over the data at a time:

* the shard list is permuted with ``seed + pass`` (the same on every rank) and shard ``j``
  of that order goes to consumer ``j % C``; a consumer is one DataLoader worker of one
  rank (``C = world_size * num_workers``, rank-major), so no sample is read twice in a pass;
* each shard's members are indexed from the tar headers (``tarfile``, random access) and
  its keys are read in a permutation seeded by ``(seed, pass, shard)``.

So every sample is identified by ``(pass, shard position, offset)`` within its consumer's
stream, which is what makes the stream resumable *exactly*: :class:`ResumableStreamLoader`
records, per worker, the position of the last sample it handed out (the batches carry it
in ``"__pos__"``), saves it in Lightning checkpoints (all ranks' positions, gathered) and
restarts each worker right after it. Skipped members are not decoded.

Why an own reader over ``tarfile`` and not the ``webdataset`` package: it is ~100 lines,
needs no dependency, and the exact (shard, offset) resume needs control of the read order
that webdataset's pipelines do not expose. It reads local (or network-mounted) files;
``pipe:``/``s3://`` URLs are not supported.

Bad samples are handled as in :class:`~starkit.data.CaptionedImageDataModule`: an
undecodable, empty, too large or extreme-aspect image is skipped and counted by cause; a
missing caption becomes ``""`` (``missing_caption="empty"``, counted) or skips the sample;
a key with no image counts as ``missing_file``; an unreadable tar counts once as
``bad_shard``, and so does a tar truncated or corrupt part of the way, whose samples before the
damage are still read (a member cut in its bytes is skipped as ``undecodable``). Counts live in a
shared-memory tensor with one row per worker.

Shuffling is shard order + within-shard order (no cross-shard mixing buffer: a buffer's
contents cannot be restored exactly without replaying the stream). img2dataset writes
samples in the order of its (usually already random) input list, so this is the usual
choice for such shards; if yours are sorted (e.g. by class), reshard them.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import re
import tarfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    MAX_ASPECT_RATIO,
    REPAIR_CAUSES,
    SKIP_CAUSES,
    SampleCounts,
    SampleError,
    decode_caption,
    decode_rgb,
    finish_caption,
    split_counts,
    var_transform,
)

CAUSES = SKIP_CAUSES + ("bad_shard",) + REPAIR_CAUSES
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
ENDLESS_BATCHES = 2 ** 40  # the "length" of an endless stream (stop with max_steps)
Position = Tuple[int, int, int]  # (pass, shard position in this consumer's list, offset in the shard)


# ------------------------------------------------------------------------------------ shards
def _expand_braces(pattern: str) -> List[str]:
    """``a{00..02}b{x,y}`` -> ``a00bx, a00by, a01bx, ...`` (zero padding kept)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [out for c in choices for out in _expand_braces(head + c + tail)]


def expand_shards(shards: Union[str, Sequence[str]]) -> List[str]:
    """Shard files from a brace pattern, a glob, a list of either, or a ``.txt`` list file.

    Raises:
        FileNotFoundError: a pattern that matches nothing or a listed file that does not exist.
    """
    items = [shards] if isinstance(shards, str) else list(shards)
    out: List[str] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if item.endswith(".txt") and os.path.isfile(item):  # a file listing shards, one per line
            with open(item) as fh:
                out += expand_shards([line.strip() for line in fh if line.strip()])
            continue
        for path in _expand_braces(item):
            if any(ch in path for ch in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise FileNotFoundError(f"shard pattern {path!r} matches no file")
                out += found
            elif not os.path.isfile(path):
                raise FileNotFoundError(f"shard {path!r} does not exist")
            else:
                out.append(path)
    if not out:
        raise FileNotFoundError(f"no shards in {shards!r}")
    return out


def split_key(name: str) -> Tuple[str, str]:
    """WebDataset naming: ``dir/000000001.seg.jpg`` -> key ``dir/000000001``, extension ``seg.jpg``."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_shard(path: str, problems: Optional[List[str]] = None) -> List[Tuple[str, Dict[str, tarfile.TarInfo]]]:
    """The keys of a tar shard in file order, each with its members by extension (headers only).

    A key whose extension appears again (the same key written twice, e.g. concatenated shards)
    starts a new sample, so neither copy is lost. A shard that is truncated or corrupt part of the
    way through keeps the members before the damage (the error is appended to ``problems``)."""
    groups: List[Tuple[str, Dict[str, tarfile.TarInfo]]] = []
    latest: Dict[str, Dict[str, tarfile.TarInfo]] = {}  # key -> its last group
    with tarfile.open(path, "r:*") as tf:
        while True:
            try:
                member = tf.next()
            except (tarfile.ReadError, EOFError) as err:  # truncated or corrupt further on: keep what came before
                if problems is not None:
                    problems.append(f"{type(err).__name__}: {err} after {len(groups)} key(s)")
                break
            if member is None:  # the end, or a cut inside a header, which tarfile takes for the end:
                size = os.path.getsize(path)
                if problems is not None and isinstance(tf.fileobj, io.BufferedReader) \
                        and size % tarfile.BLOCKSIZE:  # an uncompressed tar is whole blocks
                    problems.append(f"truncated: {size} bytes is not a whole number of {tarfile.BLOCKSIZE}-byte "
                                    f"tar blocks ({len(groups)} key(s) before the cut)")
                break
            if not member.isfile() or os.path.basename(member.name).startswith("."):
                continue
            key, ext = split_key(member.name)
            group = latest.get(key)
            if group is None or ext in group:
                group = latest[key] = {}
                groups.append((key, group))
            group[ext] = member
    return groups


def _stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha1(":".join(map(str, parts)).encode()).digest()[:8], "little")


def dist_info() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------ dataset
class WebDatasetStream(IterableDataset):
    """Streams ``{"image", "caption", "path", "__pos__"}`` from tar shards, split over ranks and
    workers, in a seeded order, resumable at any sample (see the module docstring).

    Args:
        shards: the shard files (see :func:`expand_shards`).
        resolution: output side ``R``.
        train: random crops (else centre crops).
        shuffle: permute shard order and keys within a shard, per pass.
        seed: base seed of the permutations.
        repeat: start a new pass when this consumer's shards are done (training); ``False``:
            one pass, each sample exactly once over all ranks and workers.
        max_image_pixels: as in ``CaptionedImageDataModule``.
        min_size_policy: as in ``CaptionedImageDataModule``.
        missing_caption: as in ``CaptionedImageDataModule``.
        num_workers: DataLoader workers that will read it (sizes ``counts``).
    """

    def __init__(self, shards: Sequence[str], resolution: int = 256, train: bool = True, shuffle: bool = True,
                 seed: int = 0, repeat: bool = True, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 min_size_policy: str = "upscale", missing_caption: str = "empty", num_workers: int = 0) -> None:
        self.shards = list(shards)
        self.resolution, self.shuffle, self.seed, self.repeat = resolution, shuffle, seed, repeat
        self.max_image_pixels, self.min_size_policy, self.missing_caption = max_image_pixels, min_size_policy, missing_caption
        self.transform = var_transform(resolution, train)
        self.counts = SampleCounts(CAUSES, num_workers)
        self.start_positions: Dict[int, Position] = {}  # local worker id -> last position handed out

    # which shards this consumer reads in pass `p`
    def consumer_shards(self, pass_: int, consumer: int, consumers: int) -> List[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(_stable_seed(self.seed, "shards", pass_)).shuffle(order)
        if len(order) < consumers and self.repeat:  # every consumer needs data: wrap (samples repeat in a pass)
            return [order[j % len(order)] for j in range(consumer, max(consumers, len(order)), consumers)]
        return order[consumer::consumers]

    def _consumer(self) -> Tuple[int, int, int]:
        rank, world = dist_info()
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return worker, rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict]:
        worker, consumer, consumers = self._consumer()
        if len(self.shards) < consumers and "few_shards" not in self.counts.warned:
            self.counts.warned.add("few_shards")
            rank_zero_warn(f"starkit.data: {len(self.shards)} shard(s) for {consumers} readers (ranks x workers): "
                           + ("some shards are read by several readers in each pass." if self.repeat
                              else "some readers get no data."))
        start = self.start_positions.get(worker)
        pass_, shard_pos, offset = (0, 0, 0) if start is None else (start[0], start[1], start[2] + 1)
        empty: set = set()  # shards that gave no usable sample when read whole, in this iterator
        while True:
            mine = self.consumer_shards(pass_, consumer, consumers)
            yielded = False
            while shard_pos < len(mine):
                shard_id, whole, got = mine[shard_pos], offset == 0, False
                for offset, sample in self._read_shard(shard_id, pass_, offset):
                    sample["__pos__"] = (worker, pass_, shard_pos, offset)
                    yielded = got = True
                    yield sample
                if whole and not got:
                    empty.add(shard_id)
                shard_pos, offset = shard_pos + 1, 0
            if not self.repeat or not mine:
                return
            # A reader whose every reachable shard (its own without shuffling, else any) gave no usable sample
            # would spin forever and stall the DataLoader: it stops instead (the other readers go on).
            if not yielded and (empty >= set(mine) if not self.shuffle else len(empty) == len(self.shards)):
                rank_zero_warn(f"starkit.data: reader {consumer} of {consumers} found no usable sample in "
                               f"{len(empty)} shard(s) (e.g. {self.shards[min(empty)]!r}; counts: {self.stats}); "
                               f"it stops, the other readers go on.")
                return
            pass_, shard_pos, offset = pass_ + 1, 0, 0

    def _read_shard(self, shard_id: int, pass_: int, start: int) -> Iterator[Tuple[int, dict]]:
        path, problems = self.shards[shard_id], []
        try:
            keys = index_shard(path, problems)
        except (tarfile.TarError, OSError, EOFError) as err:
            if start == 0:
                self.counts.count("bad_shard", path, f"{type(err).__name__}: {err}")
            return
        if problems and start == 0:  # damaged part of the way: the samples before the damage are still read
            self.counts.count("bad_shard", path, problems[0])
        if self.shuffle:
            random.Random(_stable_seed(self.seed, pass_, os.path.basename(path))).shuffle(keys)
        try:
            with tarfile.open(path, "r:*") as tf:
                for offset in range(start, len(keys)):
                    key, members = keys[offset]
                    name = f"{path}#{key}"
                    repairs: List[str] = []
                    try:
                        sample = self._load(tf, name, members, repairs)
                    except SampleError as err:
                        self.counts.count(err.cause, name, err.detail)
                        continue
                    except (tarfile.TarError, OSError, EOFError) as err:  # this member's bytes cut off or unreadable
                        self.counts.count("undecodable", name, f"tar member unreadable: {type(err).__name__}: {err}")
                        continue
                    for cause in repairs:
                        self.counts.count(cause, name, "")
                    yield offset, sample
        except (tarfile.TarError, OSError, EOFError) as err:  # truncated after the headers
            self.counts.count("bad_shard", path, f"{type(err).__name__}: {err}")

    def _load(self, tf: tarfile.TarFile, name: str, members: Dict[str, tarfile.TarInfo], repairs: List[str]) -> dict:
        image_ext = next((e for e in members if e in _IMAGE_EXTS or e.rsplit(".", 1)[-1] in _IMAGE_EXTS), None)
        if image_ext is None:
            raise SampleError("missing_file", f"{name} has no image member ({', '.join(sorted(members)) or 'none'})")
        caption = self._caption(tf, name, members, repairs)
        img = decode_rgb(_read(tf, members[image_ext]), name, self.max_image_pixels, repairs)
        short, long = sorted(img.size)
        if long > MAX_ASPECT_RATIO * short:
            raise SampleError("extreme_aspect", f"{name} is {img.size[0]}x{img.size[1]}")
        if short < self.resolution:
            if self.min_size_policy == "skip":
                raise SampleError("too_small", f"{name} is {img.size[0]}x{img.size[1]} < {self.resolution}")
            repairs.append("upscaled")
        try:
            image = self.transform(img)
        except Exception as err:
            raise SampleError("undecodable", f"{name}: transform failed: {err!r}") from None
        return {"image": image, "caption": caption, "path": name}

    def _caption(self, tf, name, members: Dict[str, tarfile.TarInfo], repairs: List[str]) -> str:
        member = members.get("txt") or members.get("caption")
        text = _json_caption(tf, members["json"]) if member is None and "json" in members else None
        if member is not None:
            try:
                raw = _read(tf, member)
            except (tarfile.TarError, OSError) as err:
                raise SampleError("caption_unreadable", f"{name}: {err}") from None
            text = decode_caption(raw, repairs)
        return finish_caption(text, name, self.missing_caption, repairs)

    @property
    def stats(self) -> Dict[str, Dict[str, int]]:
        """Counts by cause on this rank, summed over workers: ``{"skipped": {...}, "repaired": {...}}``."""
        return self.counts.stats()


#: keys of a sample's .json member that hold its caption, in order of preference (img2dataset writes "caption")
JSON_CAPTION_KEYS = ("caption", "text", "prompt")


def _json_caption(tf: tarfile.TarFile, member: tarfile.TarInfo) -> Optional[str]:
    """The caption string of a sample's JSON metadata, or None (no such key, not a string, unreadable JSON)."""
    try:
        meta = json.loads(_read(tf, member).decode("utf-8-sig", errors="replace"))
    except (tarfile.TarError, OSError, ValueError):
        return None
    if isinstance(meta, dict):
        for key in JSON_CAPTION_KEYS:
            if isinstance(meta.get(key), str):
                return meta[key]
    return None


def _read(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tf.extractfile(member)
    if fh is None:
        raise OSError(f"{member.name} is not a regular file")
    return fh.read()


def collate_samples(samples: List[dict]) -> dict:
    """Images stacked ``(B, 3, R, R)``; captions, paths and positions as lists."""
    return {"image": torch.stack([s["image"] for s in samples]), "caption": [s["caption"] for s in samples],
            "path": [s["path"] for s in samples], "__pos__": [s["__pos__"] for s in samples]}


# ------------------------------------------------------------------------------------ loader
class ResumableStreamLoader(DataLoader):
    """A DataLoader over a :class:`WebDatasetStream` whose position is saved in checkpoints.

    Every batch comes from one worker and carries ``__pos__`` for each sample; the loader
    keeps, per worker, the position of the last sample handed out. Each new iterator (next
    Lightning epoch, or after ``load_state_dict``) restarts every worker right after it, so
    the stream continues across epochs and resumes with no sample repeated or lost. The
    state of all ranks is gathered on save (``state_dict`` is called on every rank by
    Lightning) and each rank takes its own on load; the number of ranks and workers must
    then be the same. Workers are not persistent (a new iterator must restart them).

    Args:
        dataset: the stream.
        batches_per_epoch: batches per (Lightning) epoch on this rank; ``None``: endless (the
            loader reports a huge length; stop training with ``max_steps``).
        **kwargs: other DataLoader arguments (``batch_size``, ``num_workers``, ``pin_memory``).
    """

    def __init__(self, dataset: WebDatasetStream, batches_per_epoch: Optional[int] = None, **kwargs: Any) -> None:
        kwargs["persistent_workers"] = False
        kwargs.setdefault("collate_fn", collate_samples)
        super().__init__(dataset, **kwargs)
        self.batches_per_epoch = batches_per_epoch
        self.positions: Dict[int, Position] = {}
        self._rank_states: Optional[dict] = None

    def __len__(self) -> int:
        # Always sized: Lightning prefetches a batch ahead from loaders without a length, and the
        # position saved in a checkpoint would then be one batch ahead of training.
        return self.batches_per_epoch if self.batches_per_epoch is not None else ENDLESS_BATCHES

    def __iter__(self):
        self.dataset.start_positions = dict(self.positions)
        return self._track(super().__iter__())

    def _track(self, iterator) -> Iterator[dict]:
        n = -1
        for n, batch in enumerate(iterator):
            if self.batches_per_epoch is not None and n >= self.batches_per_epoch:
                return
            worker, pass_, shard_pos, offset = batch["__pos__"][-1]
            self.positions[int(worker)] = (int(pass_), int(shard_pos), int(offset))
            yield batch
        if n < 0 and self.dataset.repeat:  # every reader read a whole pass and found nothing: not one batch
            shards = self.dataset.shards
            raise RuntimeError(
                f"no usable sample in the {len(shards)} training shard(s) (e.g. {shards[0]!r}); counts: "
                f"{self.dataset.stats}. A shard is a tar of <key>.jpg (or .png, .webp ...) + <key>.txt (or "
                f"<key>.json with a \"caption\") members.")

    def _layout(self) -> Tuple[int, int]:
        return dist_info()[1], max(self.num_workers, 1)

    def state_dict(self) -> Dict[str, Any]:
        rank, world = dist_info()
        mine = {str(w): list(p) for w, p in self.positions.items()}
        if world > 1:
            gathered: List[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        world, workers = self._layout()
        return {"ranks": {str(r): s for r, s in enumerate(gathered)}, "world_size": world, "workers": workers,
                "num_shards": len(self.dataset.shards), "seed": self.dataset.seed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        world, workers = self._layout()
        expected = {"world_size": world, "workers": workers, "num_shards": len(self.dataset.shards),
                    "seed": self.dataset.seed}
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            raise ValueError(f"ResumableStreamLoader: the checkpoint's data layout differs from this run's "
                             f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); the stream "
                             f"position cannot resume. Resume with the same ranks, workers, shards and seed.")
        rank = dist_info()[0]
        self.positions = {int(w): tuple(p) for w, p in state["ranks"].get(str(rank), {}).items()}


# ------------------------------------------------------------------------------------ module
class WebDatasetDataModule(L.LightningDataModule):
    """Captioned images from WebDataset tar shards for ``fit``: batches ``{"image": (B, 3, R, R)
    in [-1, 1], "caption": list[str], "path": list[str], "__pos__": list}``.

    Training streams endlessly (pass after pass, reshuffled) and resumes exactly from a
    checkpoint; validation is one pass over ``val_shards``, each sample once over all ranks.

    Args:
        shards: training shards: a brace pattern (``data/{00000..00999}.tar``), a glob, a list,
            or a ``.txt`` file listing them.
        resolution: side ``R`` of the square training images.
        batch_size: images per batch (per device).
        num_workers: DataLoader workers per rank; the shards are split over ranks x workers
            (give at least that many shards, or some are read twice per pass).
        shuffle_buffer: kept for WebDataset familiarity; must be 0 (the order is shuffled per
            shard and within shards, which keeps the exact resume; see the module docstring).
        shuffle: shuffle the training shard order and the samples within each shard.
        seed: seed of the shuffles (the same on every rank).
        val_shards: validation shards (same forms), or ``None`` for no validation.
        samples_per_epoch: training samples per Lightning epoch over all ranks (for
            ``max_epochs`` and the LR schedule); ``None``: endless, use ``max_steps``.
        missing_caption: ``"empty"``: use ``""`` and count it; ``"skip"``: drop the sample.
        max_image_pixels: images with more pixels are skipped (decompression bombs).
        min_size_policy: for images whose short side is < ``resolution``: ``"upscale"`` or ``"skip"``.
        pin_memory: pin batches (only when CUDA is available).
    """

    def __init__(self, shards: Union[str, List[str]], resolution: int = 256, batch_size: int = 16,
                 num_workers: int = 4, shuffle_buffer: int = 0, shuffle: bool = True, seed: int = 0,
                 val_shards: Optional[Union[str, List[str]]] = None, samples_per_epoch: Optional[int] = None,
                 missing_caption: str = "empty", max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 min_size_policy: str = "upscale", pin_memory: bool = True) -> None:
        super().__init__()
        if missing_caption not in ("empty", "skip"):
            raise ValueError(f"missing_caption must be 'empty' or 'skip', got {missing_caption!r}")
        if min_size_policy not in ("upscale", "skip"):
            raise ValueError(f"min_size_policy must be 'upscale' or 'skip', got {min_size_policy!r}")
        if shuffle_buffer:
            raise ValueError("shuffle_buffer is not supported (it would break the exact resume); shards and "
                             "samples within shards are shuffled instead (shuffle: true). Set shuffle_buffer: 0.")
        self.save_hyperparameters()
        self.resolution, self.batch_size, self.num_workers = resolution, batch_size, num_workers
        self.train_dataset: Optional[WebDatasetStream] = None
        self.val_dataset: Optional[WebDatasetStream] = None
        self._train_loader: Optional[ResumableStreamLoader] = None

    def setup(self, stage: Optional[str] = None) -> None:
        """Expand the shard patterns (once) and build the streams."""
        if self.train_dataset is not None:
            return
        hp = self.hparams
        kwargs = dict(resolution=hp.resolution, seed=hp.seed, max_image_pixels=hp.max_image_pixels,
                      min_size_policy=hp.min_size_policy, missing_caption=hp.missing_caption,
                      num_workers=hp.num_workers)
        self.train_dataset = WebDatasetStream(expand_shards(hp.shards), train=True, shuffle=hp.shuffle,
                                              repeat=True, **kwargs)
        if hp.val_shards is not None:
            self.val_dataset = WebDatasetStream(expand_shards(hp.val_shards), train=False, shuffle=False,
                                                repeat=False, **kwargs)

    def _kwargs(self) -> dict:
        return dict(batch_size=self.batch_size, num_workers=self.num_workers,
                    pin_memory=self.hparams.pin_memory and torch.cuda.is_available())

    def train_dataloader(self) -> ResumableStreamLoader:
        """Endless, resumable batches with random crops (one loader kept: it holds the position)."""
        if self._train_loader is None:
            batches = None
            if self.hparams.samples_per_epoch:
                world = dist_info()[1]
                batches = max(1, self.hparams.samples_per_epoch // (world * self.batch_size))
            self._train_loader = ResumableStreamLoader(self.train_dataset, batches_per_epoch=batches, **self._kwargs())
        return self._train_loader

    def val_dataloader(self):
        """One pass over the validation shards with centre crops; ``[]`` without them."""
        if self.val_dataset is None:
            return []
        from starkit.utils.resumable import evaluation_generator
        return DataLoader(self.val_dataset, collate_fn=collate_samples,  # (own generator: leaves the global RNG)
                          generator=evaluation_generator(self.hparams.seed), **self._kwargs())

    def skipped_counts(self) -> Dict[str, int]:
        """Non-zero counts on this rank, e.g. ``{"train/skipped/undecodable": 3}``."""
        return split_counts({"train": self.train_dataset, "val": self.val_dataset})

    def teardown(self, stage: Optional[str] = None) -> None:
        """Warn (rank zero) with a summary of what was skipped or repaired."""
        counts = self.skipped_counts()
        if counts:
            rank_zero_warn("starkit.data: bad-sample summary for the shards: "
                           + ", ".join(f"{k}={v}" for k, v in counts.items()))
