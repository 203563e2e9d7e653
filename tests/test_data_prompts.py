"""PromptDataModule: formats, seeds, sharding, resume, streaming a 100k-line file."""
import json
import time
import tracemalloc

import pytest

from starkit.data import PromptDataModule, expected_output_path
from starkit.data import prompts as prompts_module


def _items(dm):
    dm.setup("predict")
    out = []
    for batch in dm.predict_dataloader():
        assert set(batch) == {"prompt", "seed", "index", "name"}
        assert all(isinstance(s, int) for s in batch["seed"])  # lists, not tensors
        out += [dict(zip(batch, values)) for values in zip(*batch.values())]
    return out


def test_text_file_blank_lines_and_names(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n   \n  two blue squares  \r\nthree green triangles")
    items = _items(PromptDataModule(prompt_file=str(path), num_images_per_prompt=2, seed=10))
    assert [i["prompt"] for i in items] == ["a red circle"] * 2 + ["two blue squares"] * 2 + [
        "three green triangles"] * 2
    assert [i["seed"] for i in items] == [10, 11, 12, 13, 14, 15]
    assert [i["index"] for i in items] == list(range(6))
    assert [i["name"] for i in items][:3] == ["000000_00", "000000_01", "000001_00"]


def test_jsonl_seed_and_name(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a cat", "seed": 1000, "name": "cat"},
             {"prompt": "a dog"},
             {"prompt": "../escape", "name": "../../etc/x"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = _items(PromptDataModule(prompt_file=str(path), num_images_per_prompt=2, seed=5))
    assert [(i["seed"], i["name"]) for i in items] == [
        (1000, "cat_00"), (1001, "cat_01"),  # own seed and name
        (7, "000001_00"), (8, "000001_01"),  # base seed 5 + 1 * 2
        (9, "_.._etc_x_00"), (10, "_.._etc_x_01"),  # no path separators, no leading dot
    ]
    single = _items(PromptDataModule(prompt_file=str(path)))
    assert single[0]["name"] == "cat"


@pytest.mark.parametrize("bad, match", [
    ('{"prompt": "ok"}\n{oops\n', "line 2 is not valid JSON"),
    ('{"text": "no prompt key"}\n', "line 1: expected"),
    ('{"prompt": "x", "seed": "7"}\n', "seed must be an integer"),
])
def test_jsonl_errors_name_the_line(tmp_path, bad, match):
    path = tmp_path / "p.jsonl"
    path.write_text(bad)
    with pytest.raises(ValueError, match=match):
        PromptDataModule(prompt_file=str(path)).setup("predict")


def test_seeds_independent_of_batch_size_and_workers(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt {i}" for i in range(23)))
    reference = _items(PromptDataModule(prompt_file=str(path), num_images_per_prompt=3, batch_size=1))
    for batch_size, workers in ((4, 0), (7, 0), (5, 2)):
        items = _items(PromptDataModule(prompt_file=str(path), num_images_per_prompt=3,
                                        batch_size=batch_size, num_workers=workers))
        assert sorted(items, key=lambda i: i["index"]) == reference  # no duplicate, none lost


def test_shards_split_items_without_duplicates(monkeypatch):
    stream = prompts_module.PromptStream(prompts=[f"p{i}" for i in range(10)], num_images_per_prompt=2)
    seen = []
    for shard in range(3):  # e.g. 3 ranks x 1 worker
        monkeypatch.setattr(prompts_module, "shard_info", lambda shard=shard: (shard, 3))
        indices = [item["index"] for item in stream]
        assert all(n % 3 == shard for n in indices)
        seen += indices
    assert sorted(seen) == list(range(20))


def test_resume_skips_existing_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    prompts = ["a", "b", "c"]
    everything = _items(PromptDataModule(prompts=prompts, num_images_per_prompt=2, output_dir=str(out)))
    assert len(everything) == 6
    for item in everything[:3]:  # an interrupted run wrote the first three
        with open(expected_output_path(str(out), item["name"]), "wb") as f:
            f.write(b"png")
    assert expected_output_path("o", "000000_00").endswith("000000_00.png")
    rest = _items(PromptDataModule(prompts=prompts, num_images_per_prompt=2, output_dir=str(out)))
    assert rest == everything[3:]  # same seeds and names as before, only the missing ones


def test_resume_refuses_a_folder_written_for_other_prompts(tmp_path):
    """Existing images whose sidecars name another prompt or seed: one clear error, not a silent no-op."""
    out = tmp_path / "out"
    out.mkdir()
    first = _items(PromptDataModule(prompts=["a red circle"], output_dir=str(out)))
    png = expected_output_path(str(out), first[0]["name"])
    with open(png, "wb") as f:
        f.write(b"png")
    with open(png[:-4] + ".json", "w") as f:
        json.dump({"prompt": "a red circle", "seed": first[0]["seed"]}, f)
    assert _items(PromptDataModule(prompts=["a red circle"], output_dir=str(out))) == []  # same request: resumed
    with pytest.raises(ValueError, match="another request.*a blue cross.*another output_dir"):
        PromptDataModule(prompts=["a blue cross"], output_dir=str(out)).setup("predict")
    with pytest.raises(ValueError, match="seed 7"):
        PromptDataModule(prompts=["a red circle"], seed=7, output_dir=str(out)).setup("predict")


def test_empty_sources_are_one_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="no prompts found in .*empty.txt"):
        PromptDataModule(prompt_file=str(empty)).setup("predict")
    with pytest.raises(ValueError, match="no prompts found"):
        PromptDataModule(prompts=[]).setup("predict")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptDataModule(prompt_file=str(tmp_path / "nope.txt")).setup("predict")
    with pytest.raises(ValueError, match="exactly one"):
        PromptDataModule()


def test_100k_line_file_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "big.txt"
    with open(path, "w") as f:
        for i in range(100_000):
            f.write(f"a photo of object number {i} on a table, studio light, high detail\n")

    def run():
        dm = PromptDataModule(prompt_file=str(path), batch_size=64, output_dir=str(tmp_path / "out"))
        dm.setup("predict")
        count, last = 0, None
        for batch in dm.predict_dataloader():
            count += len(batch["prompt"])
            last = batch
        assert dm.num_prompts == 100_000 and count == 100_000
        assert last["name"][-1] == "099999_00" and last["seed"][-1] == 99_999

    start = time.perf_counter()
    run()  # timed without tracemalloc, which slows Python down several times
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"took {elapsed:.1f} s"  # ~3 s on 2 loaded cores
    tracemalloc.start()
    try:
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"
    assert peak < 2 * 2**20  # in fact well under a MiB: nothing grows with the file


def _echo():
    """A LightningModule whose predict_step returns its batch (what the data module feeds predict)."""
    import lightning as L
    import torch

    class Echo(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def predict_step(self, batch, batch_idx):
            return batch

    return Echo()


def test_trainer_predict_gets_list_batches(tmp_path):
    import lightning as L

    dm = PromptDataModule(prompts=["a", "b", "c"], num_images_per_prompt=2, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    batches = trainer.predict(_echo(), datamodule=dm)
    assert [b["name"] for b in batches] == [["000000_00", "000000_01", "000001_00", "000001_01"],
                                            ["000002_00", "000002_01"]]
    assert batches[0]["seed"] == [0, 1, 2, 3]


def test_the_stream_counts_its_items_for_the_progress_bar(tmp_path, monkeypatch):
    # predict's progress bar showed "1/--": the stream now has a length once setup() counted this rank's items
    # (existing outputs skipped); each rank/worker split counts exactly what its shards yield.
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000_00.png").write_bytes(b"png")
    dm = PromptDataModule(prompts=[f"p{i}" for i in range(5)], num_images_per_prompt=2, batch_size=4,
                          output_dir=str(out))
    with pytest.raises(TypeError):
        len(dm.dataset)  # not counted yet: Lightning reads this as "no length"
    dm.setup("predict")
    assert len(dm.dataset) == 9 and len(dm.predict_dataloader()) == 3
    stream = dm.dataset
    for world, workers in ((1, 2), (3, 1), (2, 3)):
        for rank in range(world):
            yielded = 0
            for worker in range(workers):
                monkeypatch.setattr(prompts_module, "shard_info",
                                    lambda r=rank, w=worker: (r * workers + w, world * workers))
                yielded += sum(1 for _ in stream)
            assert stream.scan(rank, world, workers).mine == yielded


def test_trainer_predict_progress_bar_knows_the_total(tmp_path):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.predict(_echo(), datamodule=PromptDataModule(prompts=["a", "b", "c"], num_images_per_prompt=2,
                                                         batch_size=4), return_predictions=False)
    assert trainer.num_predict_batches == [2]


@pytest.mark.parametrize("workers, batch_size, n", [(3, 4, 3), (2, 4, 10)])
def test_trainer_predict_with_workers_loses_no_item(tmp_path, workers, batch_size, n):
    # each worker batches its own shard: 3 workers x 1 item are 3 batches, not ceil(3 / 4) = 1; Lightning stops
    # predict after len(loader) batches, so the loader's length must count them or the last items are dropped.
    import lightning as L

    path = tmp_path / "p.txt"
    path.write_text("".join(f"p{i}\n" for i in range(n)))
    dm = PromptDataModule(prompt_file=str(path), batch_size=batch_size, num_workers=workers)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    batches = trainer.predict(_echo(), datamodule=dm)
    assert sorted(i for b in batches for i in b["index"]) == list(range(n))


@pytest.mark.parametrize("bad, match", [
    ('{"prompt": "x", "name": "..."}\n', r"p.jsonl line 1: name '...' gives an empty file name"),
    ('{"prompt": "x"}\n{"prompt": "y", "seed": 99999999999999999999}\n', r"line 2: seed must be an integer in"),
    ("a plain prompt\n", r"line 1 is not valid JSON.*name the file \*.txt"),
])
def test_jsonl_field_errors_name_the_file_line_and_fix(tmp_path, bad, match):
    path = tmp_path / "p.jsonl"
    path.write_text(bad)
    with pytest.raises(ValueError, match=match):
        PromptDataModule(prompt_file=str(path)).setup("predict")
