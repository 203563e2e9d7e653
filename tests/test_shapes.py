"""The shapes world: determinism, faithful captions, the held-out split, batches, streaming."""
import json
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from starkit.data.shapes import (COLOURS, RELATIONS, SHAPES, SKILLS, ShapesDataModule, ShapesIterableDataset,
                                 ShapesWorld, _plural)


def test_same_seed_same_bytes_different_seed_differs():
    a, b, c = ShapesWorld(64, seed=0), ShapesWorld(64, seed=0), ShapesWorld(64, seed=1)
    for i in range(5):
        ia, ca, ta = a.render(i, "train")
        ib, cb, tb = b.render(i, "train")
        assert ia.tobytes() == ib.tobytes() and ca == cb and ta == tb
    assert any(a.render(i)[0].tobytes() != c.render(i)[0].tobytes() for i in range(5))
    assert a.render(0, "train")[0].tobytes() != a.render(0, "val")[0].tobytes()


@pytest.mark.parametrize("resolution", [64, 128, 96])
def test_render_size_and_scene_independent_of_resolution(resolution):
    image, caption, truth = ShapesWorld(resolution).render(3, "heldout")
    assert image.size == (resolution, resolution) and image.mode == "RGB"
    assert truth == ShapesWorld(64).scene(3, "heldout")


def _parse(caption):
    """Read (colour, shape, count) groups and the relation back from a caption."""
    text = re.sub(r"^(a photo of|an image of|a picture of) ", "", caption)
    relation = None
    for rel, words in RELATIONS.items():
        for w in sorted(words, key=len, reverse=True):
            if f" {w} " in text:
                relation, text = rel, text.replace(f" {w} ", " and ", 1)
                break
        if relation:
            break
    groups = []
    for part in re.split(r", | and ", text):
        tokens = part.split()
        count = {"two": 2, "three": 3}.get(tokens[0], 1)
        colour = next((t for t in tokens if t in COLOURS), None)
        shape = next((s for s in SHAPES if s in tokens or _plural(s) in tokens), None)
        groups.append((colour, shape, count))
    return groups, relation


def test_captions_are_faithful():
    world = ShapesWorld(64)
    for split in ("train", "heldout"):
        for i in range(300):
            truth = world.scene(i, split)
            groups, relation = _parse(truth["caption"])
            assert groups == [(g["colour"], g["shape"], g["count"]) for g in truth["require"]], truth["caption"]
            for g in truth["require"]:  # each requirement is met by exactly `count` objects, nothing extra
                hits = [o for o in truth["objects"] if all(g[k] in (None, o[k]) for k in ("colour", "shape", "size"))]
                assert len(hits) == g["count"]
            assert len(truth["objects"]) == sum(g["count"] for g in truth["require"])
            if relation:
                assert truth["relation"]["rel"] == relation
                (ax, ay), (bx, by) = truth["objects"][0]["center"], truth["objects"][1]["center"]
                assert {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation] >= 0.2


def test_objects_do_not_overlap_and_stay_inside():
    world = ShapesWorld(64)
    for i in range(300):
        boxes = [o["bbox"] for o in world.scene(i, "train")["objects"]]
        for x0, y0, x1, y1 in boxes:
            assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1
        for j, a in enumerate(boxes):
            for b in boxes[j + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_heldout_combos_never_in_train():
    world = ShapesWorld(64)
    heldout = set(world.heldout)
    assert len(heldout) == 6
    seen, skills = set(), set()
    for i in range(2000):
        truth = world.scene(i, "train")
        skills.add(truth["skill"])
        seen |= {(o["colour"], o["shape"]) for o in truth["objects"]}
    assert not seen & heldout and seen == set(world.train) and skills == set(SKILLS)
    for i in range(200):
        assert {(o["colour"], o["shape"]) for o in world.scene(i, "heldout")["objects"]} & heldout


def test_batches():
    dm = ShapesDataModule(resolution=64, batch_size=8, num_train=16, num_val=8)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "caption", "path", "objects", "skill"}
    assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert len(batch["caption"]) == len(batch["objects"]) == len(batch["skill"]) == 8
    truth = json.loads(batch["objects"][0])
    assert truth["caption"] == batch["caption"][0] and truth["skill"] == batch["skill"][0]
    val = next(iter(dm.val_dataloader()))
    assert val["path"][0] == "shapes://heldout/0"
    assert next(iter(dm.test_dataloader()))["path"][:2] == ["shapes://heldout/0", "shapes://heldout/1"]
    caption, truth = dm.prompts("heldout", 3)[0]
    assert caption == truth["caption"] == val["caption"][0]


def test_infinite_stream_splits_across_workers():
    dm = ShapesDataModule(batch_size=4, num_train=None, num_workers=2)
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset, ShapesIterableDataset)
    paths = []
    for k, batch in enumerate(loader):
        paths += batch["path"]
        if k == 5:
            break
    assert len(paths) == 24 and len(set(paths)) == 24
    assert sorted(int(p.rsplit("/", 1)[1]) for p in paths) == list(range(24))


def test_write_folder(tmp_path):
    paths = ShapesWorld(64).write_folder(str(tmp_path), 3, split="heldout")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["000000.png", "000001.png", "000002.png"]
    assert (tmp_path / "000001.txt").read_text().strip() == ShapesWorld(64).scene(1, "heldout")["caption"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        ShapesWorld(60)
    with pytest.raises(ValueError):
        ShapesWorld(64, heldout_combos=["pink circle"])
    with pytest.raises(ValueError):
        ShapesDataModule(val_split="test")


def test_cache_reads_back_the_rendered_samples(tmp_path, monkeypatch):
    from starkit.data.shapes import ShapesCache, ShapesDataModule
    dm = ShapesDataModule(resolution=32, batch_size=4, num_train=10, cache_dir=str(tmp_path))
    dm.prepare_data()
    assert dm.cache.ready and dm.cache.pixels.shape == (10, 32, 32, 3)
    cached = dm.train_dataloader().dataset[7]
    fresh = ShapesDataModule(resolution=32, batch_size=4, num_train=10).train_dataloader().dataset[7]
    assert cached["caption"] == fresh["caption"] and cached["objects"] == fresh["objects"]
    assert torch.equal(cached["image"], fresh["image"])
    import pickle
    copy = pickle.loads(pickle.dumps(dm.cache))  # what a spawned DataLoader worker receives
    assert copy.__dict__["_pixels"] is None and np.array_equal(copy.pixels[7], dm.cache.pixels[7])  # reopened
    # another world (seed) gets another folder; a second build reuses the first
    assert ShapesCache(str(tmp_path), ShapesDataModule(32, seed=1).world, "train", 10).folder != dm.cache.folder
    from starkit.data import shapes_cache

    def no_render(*args):
        raise AssertionError("a ready cache must not be rendered again")
    monkeypatch.setattr(shapes_cache, "_render_chunk", no_render)
    assert ShapesCache(str(tmp_path), dm.world, "train", 10).build(processes=1).ready


def test_cache_needs_a_fixed_length(tmp_path):
    from starkit.data.shapes import ShapesDataModule
    with pytest.raises(ValueError, match="num_train"):
        ShapesDataModule(num_train=None, cache_dir=str(tmp_path))
