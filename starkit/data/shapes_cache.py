"""A fixed-length shapes-world training set rendered once to disk and memory-mapped
(``ShapesDataModule(num_train=..., cache_dir=...)``): runs that share it spend no CPU on rendering."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np

if TYPE_CHECKING:  # shapes.py imports this module
    from .shapes import ShapesWorld

CACHE_VERSION = 1  # bump when the rendering, captions or truths of the shapes world change


def _render_chunk(args) -> Tuple[int, List[dict]]:
    """Render samples ``start .. stop-1`` into the memory-mapped array at ``path``; their truths."""
    world, split, start, stop, path = args
    pixels = np.lib.format.open_memmap(path, mode="r+")
    truths = []
    for i in range(start, stop):
        image, _, truth = world.render(i, split)
        pixels[i] = np.asarray(image)
        truths.append(truth)
    pixels.flush()
    return start, truths


class ShapesCache:
    """Samples ``0 .. n-1`` of one split rendered once to disk and memory-mapped: ``pixels.npy``
    (uint8 ``(n, R, R, 3)``) and ``truths.json`` in a folder named after everything that
    determines them (resolution, seed, held-out combinations, background probability, split, n).
    Training runs that share a fixed-length shapes set (ablations, sweeps) then spend no CPU on
    rendering. Built in parallel by :meth:`build` (atomically: a half-written cache is never read).

    Args:
        root: folder that holds the caches.
        world: the world whose samples are cached.
        split: ``train``, ``val`` or ``heldout``.
        n: number of samples.
    """

    def __init__(self, root: str, world: "ShapesWorld", split: str, n: int):
        import hashlib
        key = json.dumps([CACHE_VERSION, world.resolution, world.supersample, world.seed, sorted(world.heldout),
                          world.textured_background_prob, split, n])
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        self.world, self.split, self.n = world, split, n
        self.folder = os.path.join(root, f"shapes_{world.resolution}px_{split}_{n}_{digest}")
        self._pixels = self._truths = None

    @property
    def ready(self) -> bool:
        return os.path.exists(os.path.join(self.folder, "truths.json"))

    def build(self, processes: Optional[int] = None) -> ShapesCache:
        """Render the samples (in ``processes`` worker processes, default: all CPUs) unless present."""
        if self.ready:
            return self
        import multiprocessing
        import shutil
        tmp = f"{self.folder}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        R = self.world.resolution
        path = os.path.join(tmp, "pixels.npy")
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(self.n, R, R, 3)).flush()
        if not processes:  # the CPUs this process may use (cgroup/affinity), not all of the machine's
            processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        step = max(1, min(2048, -(-self.n // processes)))
        jobs = [(self.world, self.split, s, min(s + step, self.n), path) for s in range(0, self.n, step)]
        truths: List[Optional[dict]] = [None] * self.n
        if processes > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(processes) as pool:
                results = pool.map(_render_chunk, jobs)
        else:
            results = [_render_chunk(job) for job in jobs]
        for start, chunk in results:
            truths[start:start + len(chunk)] = chunk
        with open(os.path.join(tmp, "truths.json"), "w") as fh:
            json.dump(truths, fh)
        try:
            os.rename(tmp, self.folder)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.ready:
                raise
        return self

    def __getstate__(self) -> dict:  # DataLoader workers (spawn) reopen the file instead of receiving a copy
        return {**self.__dict__, "_pixels": None}

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(os.path.join(self.folder, "pixels.npy"), mmap_mode="r")  # (n, R, R, 3)
        return self._pixels

    @property
    def truths(self) -> List[dict]:
        if self._truths is None:
            with open(os.path.join(self.folder, "truths.json")) as fh:
                self._truths = json.load(fh)
        return self._truths
