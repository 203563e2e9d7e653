"""A procedurally generated, captioned world of coloured shapes, with a held-out split.

Every sample is fully determined by ``(seed, split, index)``: a ``numpy`` PCG64 generator
seeded with those numbers draws the scene (1 to 3 non-overlapping objects), the caption
(from a small grammar with paraphrases, always faithful to the image) and the background.
Geometry is drawn in normalised units, so one scene renders identically at 64 or 128 px.
The structured ground truth travels with each sample; :class:`starkit.eval.ShapesScore`
checks generated images against it.

Splits: ``train`` and ``val`` (same distribution, separate random streams) never contain a
held-out (colour, shape) combination, not even as one object of a scene; every ``heldout``
scene contains at least one held-out combination (compositional generalisation).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterator, List, Optional, Tuple

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .shapes_cache import ShapesCache

# Hues are far apart (>= 25 degrees) so an analytic detector separates them by hue alone.
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 35, 35), "orange": (250, 135, 10), "yellow": (240, 228, 30),
    "green": (35, 190, 60), "blue": (45, 90, 240), "purple": (165, 55, 215),
}
COLOURS: List[str] = list(PALETTE)
SHAPES: List[str] = ["circle", "square", "triangle", "cross"]
SIZES: Dict[str, Tuple[float, float]] = {"small": (0.15, 0.19), "large": (0.27, 0.33)}  # bbox side / R
SKILLS: List[str] = ["single_object", "colour", "shape", "count", "position", "colour_attribution"]
RELATIONS: Dict[str, List[str]] = {
    "left of": ["left of", "to the left of", "on the left of"],
    "right of": ["right of", "to the right of", "on the right of"],
    "above": ["above"], "below": ["below", "under"],
}
DEFAULT_HELDOUT: List[str] = ["red triangle", "orange square", "yellow cross",
                              "green circle", "blue square", "purple triangle"]
SPLIT_CODES: Dict[str, int] = {"train": 0, "val": 1, "heldout": 2}
_NUMBERS = {2: "two", 3: "three"}
_PREFIXES = ["", "", "a photo of ", "an image of ", "a picture of "]
_SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}
_MARGIN, _GAP, _REL_MIN = 0.04, 0.08, 0.2  # border margin, min gap between boxes, min offset for relations


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


class ShapesWorld:
    """Samples, captions and renders scenes of coloured shapes.

    Args:
        resolution: image side in pixels (any multiple of 16; 64 and 128 are tested).
        seed: world seed; with the split and the index it determines every sample.
        heldout_combos: "colour shape" strings that never appear in train/val and make up the
            held-out split (default :data:`DEFAULT_HELDOUT`, 6 of the 24 combinations).
        textured_background_prob: probability of a low-contrast noise or stripe background
            (otherwise plain); backgrounds are always grey, dark or light.
        supersample: drawing canvas scale before the LANCZOS downscale (anti-aliasing).
    """

    def __init__(self, resolution: int = 64, seed: int = 0, heldout_combos: Optional[List[str]] = None,
                 textured_background_prob: float = 0.3, supersample: int = 4):
        if resolution % 16 or resolution < 32:
            raise ValueError(f"resolution must be a multiple of 16 and >= 32, got {resolution}")
        self.resolution, self.seed, self.supersample = resolution, seed, supersample
        self.textured_background_prob = textured_background_prob
        combos = [tuple(c.split()) for c in (heldout_combos if heldout_combos is not None else DEFAULT_HELDOUT)]
        for colour, shape in combos:
            if colour not in PALETTE or shape not in SHAPES:
                raise ValueError(f"unknown held-out combination {colour!r} {shape!r}")
        self.heldout = sorted(set(combos))
        self.train = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in self.heldout]
        if not self.heldout or not self.train:
            raise ValueError("heldout_combos must hold between 1 and 23 of the 24 combinations")

    # ---------------------------------------------------------------- scenes
    def rng(self, index: int, split: str) -> np.random.Generator:
        """The generator that draws sample ``index`` of ``split``."""
        return np.random.Generator(np.random.PCG64([self.seed, SPLIT_CODES[split], index]))

    def scene(self, index: int, split: str = "train") -> dict:
        """The structured ground truth of one sample (no pixels); see :meth:`render`."""
        return self._scene(self.rng(index, split), split)[0]

    def _scene(self, rng: np.random.Generator, split: str) -> Tuple[dict, np.random.Generator]:
        skill = SKILLS[rng.integers(len(SKILLS))]
        pool = self.heldout if split == "heldout" else self.train
        pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
        first = pick(pool)
        if skill in ("single_object", "colour", "shape"):
            combos = [first]
        elif skill == "count":
            combos = [first] * int(rng.integers(2, 4))
        elif skill == "position":
            combos = [first, pick([c for c in self.train + self.heldout if c != first and
                                   (split == "heldout" or c in self.train)])]
        else:  # colour_attribution: every object differs in colour AND shape, so binding matters
            combos = [first]
            for _ in range(1 if rng.random() < 0.7 else 2):
                combos.append(pick([c for c in (self.train + self.heldout) if (split == "heldout" or c in self.train)
                                    and all(c[0] != o[0] and c[1] != o[1] for o in combos)]))
        order = rng.permutation(len(combos))
        combos = [combos[i] for i in order]
        relation = pick(list(RELATIONS)) if skill == "position" else None
        objects = self._place(rng, combos, relation)
        truth = {"skill": skill, "objects": objects, "relation": None}
        truth["caption"], truth["require"] = self._caption(rng, skill, objects, relation, truth)
        truth["background"] = self._background_params(rng)
        return truth, rng

    def _place(self, rng: np.random.Generator, combos: List[tuple], relation: Optional[str]) -> List[dict]:
        for attempt in range(1000):
            objects = []
            for colour, shape in combos:
                size = ["small", "large"][rng.integers(2)] if attempt < 500 else "small"
                side = float(rng.uniform(*SIZES[size]))
                lo, hi = _MARGIN + side / 2, 1 - _MARGIN - side / 2
                cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
                objects.append({"colour": colour, "shape": shape, "size": size, "side": side, "center": [cx, cy]})
            if self._valid(objects, relation):
                break
        else:  # pragma: no cover - 1000 rejections never happen with these sizes
            raise RuntimeError("could not place objects")
        for o in objects:
            side = o.pop("side")
            (cx, cy) = o["center"]
            o["bbox"] = [round(v, 4) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)]
            o["center"] = [round(cx, 4), round(cy, 4)]
        return objects

    @staticmethod
    def _valid(objects: List[dict], relation: Optional[str]) -> bool:
        for i in range(len(objects)):
            for j in range(i + 1, len(objects)):
                a, b = objects[i], objects[j]
                dx, dy = abs(a["center"][0] - b["center"][0]), abs(a["center"][1] - b["center"][1])
                reach = (a["side"] + b["side"]) / 2 + _GAP
                if dx < reach and dy < reach:
                    return False
        if relation is not None:
            (ax, ay), (bx, by) = objects[0]["center"], objects[1]["center"]
            dx, dy = bx - ax, by - ay  # image y grows downwards
            need = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
            across = abs(dy) if relation in ("left of", "right of") else abs(dx)
            return need >= _REL_MIN and need > across
        return True

    def _caption(self, rng, skill: str, objects: List[dict], relation: Optional[str], truth: dict):
        pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
        o = objects[0]
        prefix = pick(_PREFIXES)
        if skill == "single_object":
            size = o["size"] if rng.random() < 0.4 else None
            words = " ".join(w for w in (pick(_SIZE_WORDS[size]) if size else "", o["colour"], o["shape"]) if w)
            text = pick([_a(words), "one " + words])
            return prefix + text, [{"colour": o["colour"], "shape": o["shape"], "size": size, "count": 1}]
        if skill == "colour":
            text = pick([_a(o["colour"] + " shape"), _a(o["colour"] + " object"), "something " + o["colour"]])
            return prefix + text, [{"colour": o["colour"], "shape": None, "size": None, "count": 1}]
        if skill == "shape":
            text = pick([_a(o["shape"]), "a single " + o["shape"], "one " + o["shape"]])
            return prefix + text, [{"colour": None, "shape": o["shape"], "size": None, "count": 1}]
        if skill == "count":
            n = len(objects)
            return (prefix + f"{_NUMBERS[n]} {o['colour']} {_plural(o['shape'])}",
                    [{"colour": o["colour"], "shape": o["shape"], "size": None, "count": n}])
        require = [{"colour": x["colour"], "shape": x["shape"], "size": None, "count": 1} for x in objects]
        names = [_a(f"{x['colour']} {x['shape']}") for x in objects]
        if skill == "position":
            truth["relation"] = {"a": 0, "b": 1, "rel": relation}
            return f"{prefix}{names[0]} {pick(RELATIONS[relation])} {names[1]}", require
        joined = " and ".join(names) if len(names) == 2 else f"{names[0]}, {names[1]} and {names[2]}"
        return prefix + joined, require

    def _background_params(self, rng: np.random.Generator) -> dict:
        level = int(rng.integers(10, 55)) if rng.random() < 0.65 else int(rng.integers(165, 215))
        kind = "plain"
        if rng.random() < self.textured_background_prob:
            kind = ["noise", "stripes"][rng.integers(2)]
        return {"kind": kind, "level": level, "texture_seed": int(rng.integers(2**31))}

    # ---------------------------------------------------------------- pixels
    def render(self, index: int, split: str = "train") -> Tuple[Image.Image, str, dict]:
        """Render sample ``index`` of ``split`` (``train``, ``val`` or ``heldout``).

        Returns:
            ``(image, caption, truth)``: an RGB ``PIL.Image`` of side ``resolution``, the
            caption, and the ground truth: ``skill``, ``caption``, ``objects`` (colour, shape,
            size, centre and bbox in [0, 1] image units, y downwards), ``require`` (what the
            caption asks for: colour/shape/size or None, and a count), ``relation`` and
            ``background``.
        """
        truth = self.scene(index, split)
        return self.draw(truth), truth["caption"], truth

    def draw(self, truth: dict) -> Image.Image:
        """Draw a ground-truth scene at this world's resolution."""
        S = self.resolution * self.supersample
        canvas = Image.fromarray(self._background(truth["background"]), "RGB").resize((S, S), Image.NEAREST)
        pen = ImageDraw.Draw(canvas)
        for o in truth["objects"]:
            x0, y0, x1, y1 = (v * S for v in o["bbox"])
            cx, cy, colour = (x0 + x1) / 2, (y0 + y1) / 2, PALETTE[o["colour"]]
            if o["shape"] == "circle":
                pen.ellipse([x0, y0, x1, y1], fill=colour)
            elif o["shape"] == "square":
                pen.rectangle([x0, y0, x1, y1], fill=colour)
            elif o["shape"] == "triangle":
                pen.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
            else:  # cross: two bars, each a third of the side wide
                w = (x1 - x0) / 6
                pen.rectangle([x0, cy - w, x1, cy + w], fill=colour)
                pen.rectangle([cx - w, y0, cx + w, y1], fill=colour)
        return canvas.resize((self.resolution, self.resolution), Image.LANCZOS)

    def _background(self, bg: dict) -> np.ndarray:
        R, level = self.resolution, bg["level"]
        rng = np.random.Generator(np.random.PCG64(bg["texture_seed"]))
        grey = np.full((R, R), float(level))
        if bg["kind"] == "noise":  # low-frequency, low-contrast grey noise
            coarse = rng.uniform(-8, 8, size=(R // 8, R // 8)).astype(np.float32)
            grey += np.asarray(Image.fromarray(coarse, "F").resize((R, R), Image.BILINEAR)) + rng.uniform(-3, 3, (R, R))
        elif bg["kind"] == "stripes":
            angle, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.25) * R
            y, x = np.mgrid[0:R, 0:R]
            grey += 7 * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
        return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)

    def write_folder(self, folder: str, n: int, split: str = "train", start: int = 0) -> List[str]:
        """Write samples ``start .. start+n-1`` as ``NNNNNN.png`` + ``NNNNNN.txt`` (caption) +
        ``NNNNNN.json`` (ground truth) for the captioned-folder pipeline; returns the png paths."""
        os.makedirs(folder, exist_ok=True)
        paths = []
        for i in range(start, start + n):
            image, caption, truth = self.render(i, split)
            stem = os.path.join(folder, f"{i:06d}")
            image.save(stem + ".png")
            with open(stem + ".txt", "w") as f:
                f.write(caption + "\n")
            with open(stem + ".json", "w") as f:
                json.dump(truth, f)
            paths.append(stem + ".png")
        return paths


def _as_sample(pixels_hwc: np.ndarray, truth: dict, index: int, split: str) -> dict:
    """A batch item from uint8 pixels ``(R, R, 3)`` and the ground truth (which holds the caption)."""
    pixels = torch.from_numpy(np.array(pixels_hwc)).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, R, R)
    return {"image": pixels, "caption": truth["caption"], "path": f"shapes://{split}/{index}",
            "objects": json.dumps(truth), "skill": truth["skill"]}


def _sample(world: ShapesWorld, index: int, split: str) -> dict:
    image, _, truth = world.render(index, split)
    return _as_sample(np.asarray(image), truth, index, split)


class ShapesDataset(Dataset):
    """A fixed number of samples of one split (indices ``0 .. length-1``).

    Args:
        world: the world that renders the samples.
        split: ``train``, ``val`` or ``heldout``.
        length: number of samples.
        cache: a :class:`ShapesCache` of this world and split holding at least ``length``
            samples: pixels and captions are read from it instead of rendered.
    """

    def __init__(self, world: ShapesWorld, split: str, length: int, cache: Optional["ShapesCache"] = None):
        self.world, self.split, self.length, self.cache = world, split, length, cache

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self.cache is None:
            return _sample(self.world, index, self.split)
        return _as_sample(self.cache.pixels[index], self.cache.truths[index], index, self.split)


class ShapesIterableDataset(IterableDataset):
    """An endless stream of one split; DataLoader workers (and distributed ranks) take
    disjoint indices: worker ``w`` of ``W`` on rank ``r`` of ``N`` yields ``k*W*N + r*W + w``.

    Args:
        world: the world that renders the samples.
        split: ``train``, ``val`` or ``heldout``.
    """

    def __init__(self, world: ShapesWorld, split: str = "train"):
        self.world, self.split = world, split

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, ranks = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
        index, step = rank * workers + worker, workers * ranks
        while True:
            yield _sample(self.world, index, self.split)
            index += step


class ShapesDataModule(L.LightningDataModule):
    """Captioned images of coloured shapes, with structured ground truth for evaluation.

    Batches are dicts: ``image`` (B, 3, R, R) floats in [-1, 1], ``caption`` (list of str),
    ``path`` (``shapes://{split}/{index}``), ``objects`` (one JSON string of the ground
    truth per sample, for :class:`starkit.eval.ShapesScore`) and ``skill`` (list of str).

    Args:
        resolution: image side in pixels (a multiple of 16, e.g. 64 or 128).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        seed: world seed; a sample is fully determined by (seed, split, index).
        num_train: training samples per epoch; None streams an endless IterableDataset.
        num_val: samples in the validation and test sets.
        val_split: "heldout" (held-out colour-shape combinations) or "train" (the training
            distribution, drawn from a separate random stream).
        heldout_combos: "colour shape" strings kept out of training (default: 6 fixed ones).
        textured_background_prob: probability of a low-contrast textured background.
        cache_dir: with a fixed ``num_train``, render the training set once into this folder
            (``ShapesCache``: uint8 pixels memory-mapped, in ``prepare_data``) and read it from
            there: no rendering during training. None renders every sample on the fly.
    """

    def __init__(self, resolution: int = 64, batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 num_train: Optional[int] = 20000, num_val: int = 256, val_split: str = "heldout",
                 heldout_combos: Optional[List[str]] = None, textured_background_prob: float = 0.3,
                 cache_dir: Optional[str] = None):
        super().__init__()
        if val_split not in ("heldout", "train"):
            raise ValueError(f"val_split must be 'heldout' or 'train', got {val_split!r}")
        if cache_dir is not None and num_train is None:
            raise ValueError("cache_dir needs a fixed num_train (an endless stream cannot be cached): "
                             "set data.init_args.num_train, e.g. 100000, or drop cache_dir.")
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.num_train, self.num_val = batch_size, num_workers, num_train, num_val
        self.val_split = "heldout" if val_split == "heldout" else "val"
        self.world = ShapesWorld(resolution, seed, heldout_combos, textured_background_prob)
        self.cache = ShapesCache(cache_dir, self.world, "train", num_train) if cache_dir is not None else None

    def prepare_data(self) -> None:
        if self.cache is not None:
            self.cache.build()

    def _loader(self, dataset, shuffle: bool = False, evaluation: bool = False) -> DataLoader:
        from starkit.utils.resumable import evaluation_generator
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          generator=evaluation_generator(self.hparams.seed) if evaluation else None)

    def train_dataloader(self) -> DataLoader:
        if self.num_train is None:
            return self._loader(ShapesIterableDataset(self.world, "train"))
        from starkit.utils.resumable import ResumableDataLoader  # exact mid-epoch resume
        if self.cache is not None and not self.cache.ready:
            self.cache.build()  # prepare_data was not called (plain use outside a Trainer)
        return ResumableDataLoader(ShapesDataset(self.world, "train", self.num_train, self.cache), shuffle=True,
                                   seed=self.hparams.seed, batch_size=self.batch_size, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ShapesDataset(self.world, self.val_split, self.num_val), evaluation=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(ShapesDataset(self.world, "heldout", self.num_val), evaluation=True)

    def prompts(self, split: str = "heldout", n: int = 256) -> List[Tuple[str, dict]]:
        """``(caption, truth)`` of the first ``n`` samples of ``split`` (no pixels rendered),
        for generation-based evaluation with :class:`starkit.eval.ShapesScore`."""
        split = "val" if split == "train" else split  # never evaluate on the training stream itself
        return [(t["caption"], t) for t in (self.world.scene(i, split) for i in range(n))]
