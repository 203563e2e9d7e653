"""Prompts for ``predict``: a list or a (possibly huge) file, streamed one image at a time.

Every *item* is one image to generate: prompt ``i``, image ``j`` of
``num_images_per_prompt`` (``K``). Its global index is ``n = i * K + j``, its seed
``base_seed(i) + j`` and its file name stem ``f"{i:06d}_{j:02d}"`` (or the JSONL
``name``), so outputs do not depend on the batch size, the number of workers or ranks.

The file is read lazily by an ``IterableDataset``; item ``n`` goes to shard
``n % (world_size * num_workers)``, so ranks and workers never duplicate work. With an
``output_dir``, items whose image already exists are skipped: an interrupted run resumes.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

# (prompt, seed or None, name or None) for one prompt
PromptRecord = Tuple[str, Optional[int], Optional[str]]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def expected_output_path(output_dir: str, name: str) -> str:
    """Where the image of item ``name`` is written: ``<output_dir>/<name>.png``.

    The prediction writer writes ``<name>.png`` and ``<name>.json`` there; an item
    counts as done when its ``.png`` exists, so the writer should write the image last
    (or to a temporary name and rename it).

    Args:
        output_dir: The output folder.
        name: The item's file name stem (the batch's ``"name"`` entry).
    """
    return os.path.join(output_dir, f"{name}.png")


def safe_name(name: str) -> str:
    """A file-name stem from a user-given name: no folders, no leading dots."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".")
    if not cleaned:
        raise ValueError(f"name {name!r} gives an empty file name")
    return cleaned


def is_jsonl(path: str) -> bool:
    """Prompt files ending in ``.jsonl`` (or ``.json``) are JSONL; others plain text."""
    return path.lower().endswith((".jsonl", ".json"))


def read_prompt_file(path: str) -> Iterator[PromptRecord]:
    """Yield the prompts of a file one at a time (bounded memory).

    Plain text: one prompt per line, surrounding whitespace stripped, blank lines
    skipped. JSONL: one ``{"prompt": str, "seed": int (optional), "name": str
    (optional)}`` per line, blank lines skipped.

    Raises:
        ValueError: naming the file and line for bad UTF-8, bad JSON or bad fields.
    """
    jsonl = is_jsonl(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path} line {line_no} is not valid UTF-8: {err}") from None
            line = line.strip()
            if not line:
                continue
            if not jsonl:
                yield line, None, None
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path} line {line_no} is not valid JSON: {err}. A .jsonl/.json prompt file holds "
                                 f"one JSON object per line; for one plain-text prompt per line, name the file "
                                 f"*.txt") from None
            yield _check_record(record, f"{path} line {line_no}")


def _check_record(record, where: str) -> PromptRecord:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f'{where}: expected {{"prompt": str, "seed"?: int, "name"?: str}}')
    seed, name = record.get("seed"), record.get("name")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{where}: seed must be an integer, got {seed!r}")
    if seed is not None and not -2 ** 63 <= seed < 2 ** 63:  # torch.Generator.manual_seed takes 64 bits
        raise ValueError(f"{where}: seed must be an integer in [-2**63, 2**63), got {seed}")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{where}: name must be a string, got {name!r}")
    try:
        return record["prompt"], seed, None if name is None else safe_name(name)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` without ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ScanCounts(NamedTuple):
    """What one pass over every item found: ``items`` in all, ``done`` (their image exists) and ``mine`` (the
    items one rank will yield: in its shards and not done); ``per_worker``: ``mine`` split by DataLoader worker."""

    items: int
    done: int
    mine: int
    per_worker: Tuple[int, ...] = ()


def shard_info() -> Tuple[int, int]:
    """``(shard_id, num_shards)`` for this process: rank-major, then DataLoader worker."""
    rank, world = rank_and_world()
    info = get_worker_info()
    worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
    return rank * workers + worker, world * workers


class PromptStream(IterableDataset):
    """Streams one dict per image: ``{"prompt", "seed", "index", "name"}``.

    Args:
        prompts: A list of prompts (kept as given, blank ones included), or ``None``.
        prompt_file: A text or JSONL prompt file, read lazily, or ``None``.
        num_images_per_prompt: Images ``K`` per prompt.
        seed: Base seed; prompt ``i`` without its own seed gets ``seed + i * K``.
        output_dir: If given, items whose image exists there are not yielded.
    """

    def __init__(
        self,
        prompts: Optional[List[str]] = None,
        prompt_file: Optional[str] = None,
        num_images_per_prompt: int = 1,
        seed: int = 0,
        output_dir: Optional[str] = None,
    ):
        self.prompts, self.prompt_file = prompts, prompt_file
        self.num_images_per_prompt, self.seed, self.output_dir = num_images_per_prompt, seed, output_dir
        self.length: Optional[int] = None  # items this process will yield, once counted (PromptDataModule.setup)

    def __len__(self) -> int:
        """The items this rank yields (all its DataLoader workers together), once :meth:`scan`'s ``mine`` has
        been stored in ``length``; before that unknown (a ``TypeError``, which Lightning reads as "no
        length"). It gives the predict progress bar its total."""
        if self.length is None:
            raise TypeError("PromptStream: the number of items is not counted yet")
        return self.length

    def scan(self, rank: int, world: int, workers: int, on_done: Optional[Callable[[dict], None]] = None) -> ScanCounts:
        """One pass over every item: how many there are, how many already have their image (``on_done(item)``
        is called for each), and how many rank ``rank`` of ``world`` will yield with ``workers`` DataLoader
        workers (shards ``rank * workers .. rank * workers + workers - 1`` of ``world * workers``)."""
        workers = max(workers, 1)
        num_shards, first = world * workers, rank * workers
        resume = self.has_outputs()
        items = done = 0
        per_worker = [0] * workers
        for item in self.all_items():
            items += 1
            if resume and self.is_done(item):
                done += 1
                if on_done is not None:
                    on_done(item)
            elif first <= item["index"] % num_shards < first + workers:
                per_worker[item["index"] % num_shards - first] += 1
        return ScanCounts(items, done, sum(per_worker), tuple(per_worker))

    def records(self) -> Iterator[PromptRecord]:
        """The prompts, in order, as ``(prompt, seed or None, name or None)``."""
        if self.prompt_file is not None:
            return read_prompt_file(self.prompt_file)
        return ((prompt, None, None) for prompt in self.prompts)

    def all_items(self) -> Iterator[dict]:
        """Every item in order, ignoring shards and existing outputs."""
        k = self.num_images_per_prompt
        for i, (prompt, seed, name) in enumerate(self.records()):
            base_seed = seed if seed is not None else self.seed + i * k
            for j in range(k):
                if name is None:
                    stem = f"{i:06d}_{j:02d}"
                else:
                    stem = name if k == 1 else f"{name}_{j:02d}"
                yield {"prompt": prompt, "seed": base_seed + j, "index": i * k + j, "name": stem}

    def has_outputs(self) -> bool:
        """Whether ``output_dir`` holds any file (if not, no item needs a ``stat``)."""
        if self.output_dir is None or not os.path.isdir(self.output_dir):
            return False
        with os.scandir(self.output_dir) as entries:
            return next(entries, None) is not None

    def is_done(self, item: dict) -> bool:
        """Whether the item's image already exists in ``output_dir``."""
        return self.output_dir is not None and os.path.exists(
            expected_output_path(self.output_dir, item["name"])
        )

    def __iter__(self) -> Iterator[dict]:
        shard, num_shards = shard_info()
        resume = self.has_outputs()
        for item in self.all_items():
            if item["index"] % num_shards == shard and not (resume and self.is_done(item)):
                yield item


def collate_prompts(items: List[dict]) -> Dict[str, list]:
    """Batch items as lists (plain ints, not tensors): ``{"prompt": [...], "seed": [...], ...}``."""
    return {key: [item[key] for item in items] for key in ("prompt", "seed", "index", "name")}


class PromptDataModule(L.LightningDataModule):
    """Prompts for ``predict``; batches ``{"prompt": list[str], "seed": list[int],
    "index": list[int], "name": list[str]}``, one entry per image.

    Give exactly one of ``prompts`` or ``prompt_file``. Prompt ``i``'s image ``j`` gets
    seed ``base_seed(i) + j`` (``base_seed(i)`` is the JSONL ``seed`` or
    ``seed + i * num_images_per_prompt``) and name ``f"{i:06d}_{j:02d}"`` (or the JSONL
    ``name``, with ``_{j:02d}`` appended when ``num_images_per_prompt > 1``), whatever
    the batch size, workers or ranks.

    Args:
        prompts: Prompts given inline, e.g. ``["a red circle", "two blue squares"]``.
        prompt_file: A prompt file: plain text with one prompt per line (blank lines
            skipped), or ``.jsonl`` with ``{"prompt": str, "seed": int, "name": str}``
            per line (``seed`` and ``name`` optional). Streamed, so it may be huge.
        num_images_per_prompt: Images generated for each prompt.
        seed: Base seed of the prompts that do not carry their own.
        batch_size: Images per batch (per device).
        num_workers: DataLoader workers reading the prompt file (0 is usually enough).
        output_dir: The prediction writer's folder; items whose ``<name>.png`` already
            exists there are skipped, so an interrupted run resumes.
    """

    def __init__(
        self,
        prompts: Optional[List[str]] = None,
        prompt_file: Optional[str] = None,
        num_images_per_prompt: int = 1,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        output_dir: Optional[str] = None,
    ):
        super().__init__()
        if (prompts is None) == (prompt_file is None):
            raise ValueError("give exactly one of `prompts` (a list) or `prompt_file` (a file)")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        self.save_hyperparameters()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset = PromptStream(prompts, prompt_file, num_images_per_prompt, seed, output_dir)
        self.num_prompts: Optional[int] = None
        self._worker_counts: Tuple[int, ...] = ()  # items per DataLoader worker on this rank (setup)

    @property
    def source(self) -> str:
        """The prompt file, or ``"the prompts list"``."""
        return self.dataset.prompt_file or "the `prompts` list"

    def setup(self, stage: Optional[str] = None) -> None:
        """Check the whole source once, streaming: errors come before any generation."""
        if self.num_prompts is not None:
            return
        if self.dataset.prompt_file is not None and not os.path.isfile(self.dataset.prompt_file):
            raise FileNotFoundError(f"prompt file {self.dataset.prompt_file!r} does not exist")
        counts = self.dataset.scan(*rank_and_world(), self.num_workers, on_done=self._check_existing)
        if counts.items == 0:
            raise ValueError(f"no prompts found in {self.source}")
        self.num_prompts = counts.items // self.dataset.num_images_per_prompt
        if counts.done:
            rank_zero_info(
                f"starkit.data: {counts.done} of {counts.items} images already exist in "
                f"{self.dataset.output_dir!r}; generating the other {counts.items - counts.done}"
            )
        self.dataset.length = counts.mine
        self._worker_counts = counts.per_worker

    def _check_existing(self, item: dict) -> None:
        """An existing image is kept only if its JSON sidecar (when there is one) was written for the same
        prompt and seed: otherwise the folder holds another request's images, and skipping them would
        silently generate nothing for this one."""
        png = expected_output_path(self.dataset.output_dir, item["name"])
        sidecar = os.path.splitext(png)[0] + ".json"
        try:
            with open(sidecar, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return  # no readable sidecar (written by another tool): the image counts as done
        if not isinstance(meta, dict):
            return
        old = (meta.get("prompt"), meta.get("seed"))
        if old != (item["prompt"], item["seed"]):
            raise ValueError(
                f"{png} already exists for another request (prompt {old[0]!r}, seed {old[1]}), but this run wants "
                f"prompt {item['prompt']!r}, seed {item['seed']} under that name. Existing images are never "
                f"overwritten, so nothing would be generated for it: use another output_dir (e.g. "
                f"--data.init_args.output_dir=outputs/new), or delete the old files.")

    @property
    def num_images_per_prompt(self) -> int:
        """Images per prompt (``GridWriter`` puts one prompt per row)."""
        return self.dataset.num_images_per_prompt

    def predict_dataloader(self) -> DataLoader:
        """Batches of items as lists; see the class docstring for the format."""
        # Each worker batches its own shard, so there are sum(ceil(n_w / B)) batches, not ceil(sum(n_w) / B);
        # Lightning stops predict after len(loader) batches, so a short length would drop items.
        batches = sum(-(-n // self.batch_size) for n in self._worker_counts) if self._worker_counts else None
        return _PromptLoader(
            self.dataset,
            num_batches=batches,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
        )


class _PromptLoader(DataLoader):
    """A DataLoader whose length is the exact number of batches its workers yield (``num_batches``, once
    counted by ``PromptDataModule.setup``; otherwise DataLoader's own)."""

    def __init__(self, dataset, num_batches: Optional[int] = None, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches if self.num_batches is not None else super().__len__()
