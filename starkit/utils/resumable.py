"""A DataLoader that resumes mid-epoch at the same sample, with the same random stream.

Lightning restores a DataLoader's position only when the loader itself has ``state_dict``
and ``load_state_dict`` (it stores them in the checkpoint's loop state). A plain
``DataLoader(shuffle=True)`` has neither: resuming from a mid-epoch checkpoint restarts the
epoch with a new permutation (Lightning warns "your dataloader is not resumable") and the
epoch ends after the remaining number of batches, so some samples are seen twice and
others not at all in that epoch.

:class:`ResumableDataLoader` (map-style datasets, one process per rank) fixes that:

- the order of epoch ``e`` is ``randperm(len(dataset), generator=seed + e)`` (or ``0..n-1``
  without shuffling), independent of the global random state;
- its state is ``{"epoch", "batches"}`` (batches handed out in that epoch) plus the global
  torch random state at the moment of the checkpoint; after ``load_state_dict`` the next
  epoch iterator skips the consumed batches *without loading them*, and the global torch
  random state is restored when the first batch is handed out, so caption dropout and
  drop-path draws continue as in an uninterrupted run.

For a sized loader Lightning does not read ahead (its fetcher prefetches only when the
length is unknown), so "batches handed out" is exactly "batches trained on".

Under DDP every rank takes its own shard (``perm[rank::world_size]``, padded by wrapping to
equal length); the sampler is a DistributedSampler by type, so Lightning does not replace it
(no ``use_distributed_sampler: false`` needed).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler


def _dist_info():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _EpochSampler(DistributedSampler):
    """Indices of one epoch (seeded permutation), starting after ``skip`` indices.

    A DistributedSampler by type only, so that Lightning leaves it in place under DDP (it
    shards by rank itself); the epoch is set by :class:`ResumableDataLoader`.
    """

    def __init__(self, length: int, shuffle: bool, seed: int) -> None:  # no super().__init__: no process group needed
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the loader sets the epoch (Lightning calls this on DistributedSamplers)."""

    def _indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        rank, world = _dist_info()
        if world > 1:
            per_rank = -(-self.length // world)
            order = (order * (1 + per_rank * world // max(len(order), 1)))[: per_rank * world][rank::world]
        return order

    def __len__(self) -> int:
        rank, world = _dist_info()
        return -(-self.length // world) if world > 1 else self.length

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])


class ResumableDataLoader(DataLoader):
    """A map-style DataLoader whose position within the epoch is saved in Lightning checkpoints.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``).
        shuffle: a new seeded permutation every epoch.
        seed: base seed of the permutations (epoch ``e`` uses ``seed + e``).
        restore_rng: also save and restore the global torch random state (exact resume of
            random augmentations, caption dropout, drop-path).
        **kwargs: the other DataLoader arguments (``batch_size``, ``num_workers``, ...);
            ``sampler``, ``batch_sampler`` and ``shuffle`` are set by this class.
    """

    def __init__(self, dataset, shuffle: bool = False, seed: int = 0, restore_rng: bool = True, **kwargs: Any) -> None:
        for key in ("sampler", "batch_sampler"):
            if kwargs.get(key) is not None:
                raise ValueError(f"ResumableDataLoader sets its own {key}.")
            kwargs.pop(key, None)
        self._epoch_sampler = _EpochSampler(len(dataset), shuffle, seed)
        super().__init__(dataset, sampler=self._epoch_sampler, **kwargs)
        self.restore_rng = restore_rng
        self._next_epoch, self._batches, self._rng_to_restore = 0, 0, None
        self._resume_skip: Optional[int] = None

    def __iter__(self):
        sampler = self._epoch_sampler
        sampler.epoch = self._next_epoch
        skip = self._resume_skip or 0
        self._resume_skip = None
        if skip >= len(self):  # the checkpoint was taken on the last batch: that epoch is done
            sampler.epoch, skip = sampler.epoch + 1, 0
        sampler.skip = skip * (self.batch_size or 1)
        self._next_epoch = sampler.epoch + 1
        self._current_epoch, self._batches = sampler.epoch, skip
        return self._count(super().__iter__())

    def _count(self, iterator) -> Iterator:
        for batch in iterator:
            if self._rng_to_restore is not None:
                _set_rng_state(self._rng_to_restore)
                self._rng_to_restore = None
            self._batches += 1
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        state = {"epoch": getattr(self, "_current_epoch", 0), "batches": self._batches,
                 "seed": self._epoch_sampler.seed, "length": self._epoch_sampler.length}
        if self.restore_rng:
            state["rng"] = _get_rng_state()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("length") not in (None, self._epoch_sampler.length):
            raise ValueError(f"ResumableDataLoader: the checkpoint was taken with a dataset of {state['length']} "
                             f"samples, this one has {self._epoch_sampler.length}; the data position cannot resume.")
        self._next_epoch, self._resume_skip = int(state["epoch"]), int(state["batches"])
        if self.restore_rng and state.get("rng") is not None:
            self._rng_to_restore = state["rng"]


def _get_rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def evaluation_generator(seed: int = 0) -> torch.Generator:
    """A ``torch.Generator`` for validation, test and prediction loaders. Every ``iter(DataLoader)`` draws its
    workers' base seed from the loader's generator, or from the global one when it has none: a validation
    between training steps would then change training's later random draws (caption dropout, token dropping,
    drop path). With its own generator, validation leaves them as they were, and its workers get the same
    seeds at every validation."""
    return torch.Generator().manual_seed(seed)
