"""WebDataset tar shards: expansion, bad samples, split over ranks x workers, exact resume."""
import io
import os
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from starkit.data import webdataset as wds
from starkit.data.webdataset import (ResumableStreamLoader, WebDatasetDataModule, WebDatasetStream, collate_samples,
                                     expand_shards)

N_SHARDS, PER_SHARD = 3, 7
CORRUPT, NO_CAPTION = "00001/000000009", "00002/000000016"  # shard/key of the two bad samples


def _jpeg(i):
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (i * 11 % 256, i * 37 % 256, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(root, n_shards=N_SHARDS, per_shard=PER_SHARD):
    """img2dataset's layout: 0000s.tar with 00000000k.jpg/.txt/.json; one corrupt jpg, one missing caption."""
    os.makedirs(root, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tf:
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"{i:09d}"
                where = f"{s:05d}/{key}"
                _add(tf, f"{key}.jpg", b"\xff\xd8\xff\xe0 not really a jpeg" if where == CORRUPT else _jpeg(i))
                if where != NO_CAPTION:
                    _add(tf, f"{key}.txt", f"caption {i}".encode())
                _add(tf, f"{key}.json", b'{"key": "%s"}' % key.encode())
    return str(root)


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards")


def _key(path):
    shard, key = path.split("#")
    return f"{os.path.basename(shard)[:-4]}/{key}"


GOOD = {f"{s:05d}/{s * PER_SHARD + j:09d}" for s in range(N_SHARDS) for j in range(PER_SHARD)} - {CORRUPT}


def test_expand_shards(shards, tmp_path):
    brace = expand_shards(os.path.join(shards, "{00000..00002}.tar"))
    assert [os.path.basename(p) for p in brace] == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_shards(os.path.join(shards, "*.tar")) == brace
    assert expand_shards([brace[0], os.path.join(shards, "0000[12].tar")]) == brace
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(brace) + "\n")
    assert expand_shards(str(listing)) == brace
    with pytest.raises(FileNotFoundError, match="00003.tar"):
        expand_shards(os.path.join(shards, "{00000..00003}.tar"))


def test_one_pass_bad_samples_counted(shards):
    ds = WebDatasetStream(expand_shards(os.path.join(shards, "*.tar")), resolution=32, repeat=False, seed=3)
    samples = list(ds)
    keys = [_key(s["path"]) for s in samples]
    assert Counter(keys) == Counter(GOOD)  # 20 usable samples, each once; the corrupt one skipped
    assert samples[0]["image"].shape == (3, 32, 32)
    assert next(s["caption"] for s in samples if _key(s["path"]) == NO_CAPTION) == ""
    assert ds.stats == {"skipped": {"undecodable": 1}, "repaired": {"caption_missing": 1}}


def _rank_keys(shards, rank, world, monkeypatch, workers=2):
    monkeypatch.setattr(wds, "dist_info", lambda: (rank, world))
    ds = WebDatasetStream(expand_shards(os.path.join(shards, "*.tar")), resolution=32, repeat=False,
                          num_workers=workers)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate_samples)
    keys = [_key(p) for batch in loader for p in batch["path"]]
    return keys, ds.stats


def test_two_ranks_two_workers_each_sample_once(shards, monkeypatch):
    seen, skipped = [], Counter()
    for rank in range(2):
        keys, stats = _rank_keys(shards, rank, 2, monkeypatch)
        seen += keys
        skipped.update(stats["skipped"])
    assert Counter(seen) == Counter(GOOD)
    assert skipped == {"undecodable": 1}  # the counts add up over workers


def _stream_by_worker(batches):
    out = {}
    for batch in batches:
        for pos, path in zip(batch["__pos__"], batch["path"]):
            out.setdefault(pos[0], []).append(_key(path))
    return out


def test_resume_mid_shard(shards):
    files = expand_shards(os.path.join(shards, "*.tar"))

    def loader():
        ds = WebDatasetStream(files, resolution=32, repeat=True, num_workers=2, seed=1)
        return ResumableStreamLoader(ds, batch_size=2, num_workers=2)

    full = []
    for i, batch in enumerate(loader()):
        full.append(batch)
        if i == 29:  # 60 samples: several passes (20 usable each); longer than the interrupted run
            break
    first = loader()
    head = [b for _, b in zip(range(3), first)]  # worker 0: 2 batches (mid-shard), worker 1: 1 batch
    state = first.state_dict()
    assert 0 < state["ranks"]["0"]["0"][2] < PER_SHARD - 1  # worker 0 stopped inside a shard
    resumed = loader()
    resumed.load_state_dict(state)
    tail = [b for _, b in zip(range(13), resumed)]
    want, got = _stream_by_worker(full), _stream_by_worker(head + tail)
    for worker, keys in got.items():
        assert keys == want[worker][: len(keys)], f"worker {worker} diverged after resume"
    # within the first pass, no sample twice and none lost
    first_pass_keys = [_key(p) for b in head + tail for pos, p in zip(b["__pos__"], b["path"]) if pos[1] == 0]
    assert Counter(first_pass_keys) == Counter(GOOD)


def test_layout_change_refused(shards):
    ds = WebDatasetStream(expand_shards(os.path.join(shards, "*.tar")), resolution=32)
    state = ResumableStreamLoader(ds, batch_size=2, num_workers=0).state_dict()
    other = ResumableStreamLoader(ds, batch_size=2, num_workers=2)
    with pytest.raises(ValueError, match="workers"):
        other.load_state_dict(state)


def test_datamodule_fit_and_resume_through_lightning(shards, tmp_path):
    """A tiny generator trains on the shards; a run resumed from a mid-epoch checkpoint sees the
    same samples as an uninterrupted one."""
    import lightning as L
    from conftest import make_tiny_generator

    class Record(L.Callback):
        def __init__(self):
            self.keys = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.keys += [_key(p) for p in batch["path"]]

    def fit(steps, root, ckpt=None):
        dm = WebDatasetDataModule(os.path.join(shards, "{00000..00002}.tar"), resolution=32, batch_size=2,
                                  num_workers=0, seed=5, val_shards=os.path.join(shards, "00000.tar"))
        rec = Record()
        ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root), save_last=True, every_n_train_steps=1)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[rec, ckpt_cb], limit_val_batches=1,
                            val_check_interval=steps, num_sanity_val_steps=0)
        trainer.fit(make_tiny_generator(), datamodule=dm, ckpt_path=ckpt)
        return rec.keys, dm

    full, _ = fit(6, tmp_path / "a")
    first, dm = fit(3, tmp_path / "b")
    assert dm.skipped_counts().get("val/repaired/caption_missing") is None
    rest, _ = fit(6, tmp_path / "c", ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert first + rest == full


def test_a_key_written_twice_in_a_shard_is_two_samples(tmp_path):
    # the second a.jpg/a.txt (e.g. concatenated shards) overwrote the first: one sample silently lost, not counted
    path = str(tmp_path / "dup.tar")
    with tarfile.open(path, "w") as tf:
        for name, data in (("a.jpg", _jpeg(1)), ("a.txt", b"first"), ("b.jpg", _jpeg(2)), ("b.txt", b"b"),
                           ("a.jpg", _jpeg(3)), ("a.txt", b"second")):
            _add(tf, name, data)
    stream = WebDatasetStream([path], resolution=16, train=False, shuffle=False, repeat=False)
    assert [s["caption"] for s in stream] == ["first", "b", "second"]


def _bounded_passes(stream, limit=200):
    """Fail (instead of hanging the test) if the stream starts more than ``limit`` passes."""
    calls, plain = [], stream.consumer_shards

    def consumer_shards(*args):
        calls.append(1)
        assert len(calls) <= limit, "the stream loops over its passes forever"
        return plain(*args)
    stream.consumer_shards = consumer_shards
    return stream


@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_without_a_usable_sample_are_an_error_not_a_hang(tmp_path, shuffle):
    # an endless stream over shards that give nothing (an empty tar, a non-tar) looped forever without yielding
    empty, junk = str(tmp_path / "empty.tar"), str(tmp_path / "junk.tar")
    tarfile.open(empty, "w").close()
    with open(junk, "wb") as fh:
        fh.write(b"not a tar" * 200)
    stream = _bounded_passes(WebDatasetStream([empty, junk], resolution=16, shuffle=shuffle, repeat=True))
    loader = ResumableStreamLoader(stream, batch_size=2, num_workers=0)
    with pytest.raises(RuntimeError, match="no usable sample in the 2 training shard"):
        next(iter(loader))


def test_a_reader_with_only_empty_shards_stops_and_the_others_go_on(shards, tmp_path):
    empty = str(tmp_path / "empty.tar")
    tarfile.open(empty, "w").close()
    good = os.path.join(shards, "00000.tar")
    for shuffle in (True, False):
        stream = _bounded_passes(WebDatasetStream([good, empty], resolution=16, shuffle=shuffle, repeat=True))
        for consumer in range(2):  # 2 readers: samples keep coming, or (its one shard is empty) the stream ends
            stream._consumer = lambda c=consumer: (c, c, 2)
            taken = [s["path"] for _, s in zip(range(3 * PER_SHARD), iter(stream))]
            # shuffled, each reader gets the good shard in some passes; not shuffled, reader 1 only the empty one
            assert len(taken) == (0 if not shuffle and consumer == 1 else 3 * PER_SHARD)


def test_captions_from_caption_and_json_members(tmp_path):
    """A sample without a .txt caption takes a .caption member, else the "caption" (or "text", "prompt") string of
    its .json metadata; the .txt wins when present; JSON without such a string (or broken) is a missing caption."""
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tf:
        for key, members in {
            "a": {"txt": b"from txt", "json": b'{"caption": "from json"}'},
            "b": {"json": b'{"caption": "  from json  ", "text": "no"}'},
            "c": {"json": b'{"text": "text key"}'},
            "d": {"caption": b"caption member"},
            "e": {"json": b'{"caption": 3}'},
            "f": {"json": b'{"caption": '},
            "g": {"json": b'{"prompt": ""}'},
        }.items():
            _add(tf, f"{key}.jpg", _jpeg(ord(key)))
            for ext, data in members.items():
                _add(tf, f"{key}.{ext}", data)
    ds = WebDatasetStream([str(path)], resolution=32, repeat=False, shuffle=False)
    captions = {s["path"].split("#")[1]: s["caption"] for s in ds}
    assert captions == {"a": "from txt", "b": "from json", "c": "text key", "d": "caption member", "e": "", "f": "",
                        "g": ""}
    assert ds.stats == {"skipped": {}, "repaired": {"caption_missing": 2, "caption_empty": 1}}


def test_a_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    """A shard cut off part of the way (a copy interrupted): the samples whose bytes are all there are read, the
    damage is counted once as bad_shard, and a member cut in its data is skipped as undecodable, not the shard."""
    root = write_shards(tmp_path / "full", n_shards=1, per_shard=8)
    data = open(os.path.join(root, "00000.tar"), "rb").read()
    whole = {s["path"].split("#")[1] for s in WebDatasetStream([os.path.join(root, "00000.tar")], resolution=32,
                                                                 repeat=False, shuffle=False)}
    assert len(whole) == 8
    for cut in (len(data) // 2, len(data) // 2 + 700):
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(data[:cut])
        ds = WebDatasetStream([str(path)], resolution=32, repeat=False, shuffle=True, seed=1)
        got = [s["path"].split("#")[1] for s in ds]
        assert 2 <= len(got) < 8 and set(got) <= whole, cut
        assert ds.stats["skipped"].get("bad_shard") == 1
