"""Pre-tokenized data (starkit.data.tokens): written once, served as index rows, trained on without the
VQ encoder, with clear errors for folders that do not fit."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_tiny_generator, make_tiny_tokenizer
from starkit.data.captioned import CaptionedImageDataset, scan_folder
from starkit.data.tokens import TokenizedDataModule, TokenizedDataset, read_meta, tokenize_dataset

R = 32  # the tiny tokenizer's side (scales 1, 2, 3, 4 at downsampling 8)


def _folder(root, n=6):
    for i in range(n):
        Image.effect_noise((40 + 3 * i, 36), 60 + i).convert("RGB").save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture number {i}")
    return root


def _tokenize(tmp_path):
    """Tokenize the ``images`` fixture's folder into ``tmp_path / "tokens"``."""
    items = scan_folder(str(tmp_path / "images"), "empty")[0]
    dataset = CaptionedImageDataset(items, resolution=R, train=False)
    tok = make_tiny_tokenizer()
    meta = tokenize_dataset(tok, dataset, str(tmp_path / "tokens"), batch_size=4, num_workers=0, device="cpu")
    return tok, dataset, meta


@pytest.fixture
def images(tmp_path):
    (tmp_path / "images").mkdir()
    return _folder(tmp_path / "images")


def test_token_rows_are_the_tokenizers_indices_of_the_centre_crops(tmp_path, images):
    tok, dataset, meta = _tokenize(tmp_path)
    root = tmp_path / "tokens"
    assert sorted(os.listdir(root)) == ["captions.jsonl", "indices.npy", "meta.json"]  # no partial files left
    assert meta == read_meta(str(root)) and meta["count"] == 6 and meta["resolution"] == R
    assert meta["patch_nums"] == [1, 2, 3, 4] and meta["length"] == 30 and meta["codebook_size"] == 16
    rows = np.load(root / "indices.npy")
    assert rows.dtype == np.uint16 and rows.shape == (6, 30)
    with torch.no_grad():
        expected = torch.cat(tok.encode(torch.stack([dataset[i]["image"] for i in range(6)])), dim=1)
    assert torch.equal(torch.from_numpy(rows.astype(np.int64)), expected)
    item = TokenizedDataset(str(root))[2]
    assert item["caption"] == dataset[2]["caption"] and torch.equal(item["indices"], expected[2])


def test_training_on_tokens_equals_training_on_the_images(tmp_path, images):
    _tokenize(tmp_path)
    dm = TokenizedDataModule(str(tmp_path / "tokens"), batch_size=3, num_workers=0, val_size=2)
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2
    assert not set(dm.train_dataset.rows) & set(dm.val_dataset.rows)
    batch = next(iter(dm.val_dataloader()))
    assert batch["indices"].shape == (2, 30) and batch["indices"].dtype == torch.long
    gen = make_tiny_generator(caption_dropout=0.0).eval()
    items = scan_folder(str(images), "empty")[0]
    dataset = CaptionedImageDataset(items, resolution=R, train=False)
    image_batch = {"image": torch.stack([dataset[i]["image"] for i in dm.val_dataset.rows]),
                   "caption": [dataset[i]["caption"] for i in dm.val_dataset.rows]}
    gen.log = lambda *args, **kwargs: None
    with torch.no_grad():
        assert torch.equal(gen._loss(batch, "val"), gen._loss(image_batch, "val"))


def test_folders_that_do_not_fit_are_clear_errors(tmp_path, images):
    with pytest.raises(FileNotFoundError, match="not a token folder"):
        TokenizedDataModule(str(tmp_path / "nowhere"))
    _tokenize(tmp_path)
    root = str(tmp_path / "tokens")
    with pytest.raises(ValueError, match=r"val_size=6 must be in \[0, 6\)"):
        TokenizedDataModule(root, val_size=6).setup("fit")
    from starkit.callbacks.guards import check_data_fits_model
    other = make_tiny_generator(patch_nums=[1, 2, 4])
    with pytest.raises(ValueError, match=r"tokens of the scales \(1, 2, 3, 4\), the model uses \(1, 2, 4\)"):
        check_data_fits_model(other, TokenizedDataModule(root))
    with pytest.raises(ValueError, match="does not fit this generator's scales"):
        other._split_scales(torch.zeros(2, 30, dtype=torch.long))
    check_data_fits_model(make_tiny_generator(), TokenizedDataModule(root))  # the matching model passes
    os.remove(os.path.join(root, "captions.jsonl"))
    with open(os.path.join(root, "captions.jsonl"), "w") as fh:
        fh.write(json.dumps({"caption": "one", "path": ""}) + "\n")
    with pytest.raises(ValueError, match="6 token rows but 1 captions"):
        TokenizedDataset(root)


def test_command_line_and_fit_through_the_cli(tmp_path, images):
    from starkit.cli import main as cli
    tok_dir = tmp_path / "tok"
    make_tiny_tokenizer().save_pretrained(str(tok_dir))
    cli(["tokenize", "--tokenizer", str(tok_dir), "--root", str(images), "--resolution", str(R), "--out",
         str(tmp_path / "tokens"), "--num-workers", "0", "--batch-size", "4", "--device", "cpu"])
    assert read_meta(str(tmp_path / "tokens"))["count"] == 6
    for recipe in ("recipes/generator/tiny.yaml", "recipes/generator/star_d16_256_pretokenized.yaml"):
        cli(["fit", "--config", os.path.join(REPO, recipe),
             "--config", os.path.join(REPO, "tests/conf/tiny_generator_overrides.yaml"),
             f"--model.init_args.tokenizer.init_args.pretrained={tok_dir}",
             "--data=starkit.data.TokenizedDataModule", f"--data.init_args.root={tmp_path / 'tokens'}",
             "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.val_size=2",
             "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}"])


def test_a_failed_or_empty_run_leaves_no_partial_files_and_workers_reopen_the_file(tmp_path, images):
    import pickle

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            if i == 3:
                raise OSError("disk gone")
            return {"image": torch.zeros(3, R, R), "caption": "x"}

    out = tmp_path / "tokens"
    with pytest.raises(OSError, match="disk gone"):
        tokenize_dataset(make_tiny_tokenizer(), Broken(), str(out), batch_size=2, num_workers=0, device="cpu")
    assert os.listdir(out) == []
    with pytest.raises(ValueError, match="empty"):
        tokenize_dataset(make_tiny_tokenizer(), [], str(out), device="cpu")
    _tokenize(tmp_path)
    dataset = TokenizedDataset(str(out))
    dataset[0]  # opens the memory map
    assert dataset.__dict__["_token_rows"] is not None
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    assert copy.__dict__["_token_rows"] is None  # no copy of the rows: it reopens the file
    assert torch.equal(copy[5]["indices"], dataset[5]["indices"])


def test_a_rerun_that_stops_before_its_meta_leaves_no_stale_meta_and_mixed_files_are_refused(tmp_path, images,
                                                                                            monkeypatch):
    from starkit.data import tokens as tokens_module
    _tokenize(tmp_path)
    root = str(tmp_path / "tokens")
    meta = read_meta(root)
    with open(os.path.join(root, "meta.json"), "w") as fh:  # rows of another run's scales
        json.dump({**meta, "length": 21, "patch_nums": [1, 2, 4]}, fh)
    with pytest.raises(ValueError, match=r"indices.npy holds \(6, 30\) token rows but meta.json describes \(6, 21\)"):
        TokenizedDataset(root)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(tokens_module, "atomic_write_bytes", crash)  # new rows in place, the meta not written
    with pytest.raises(OSError, match="disk full"):
        _tokenize(tmp_path)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="not a token folder"):  # not the old meta over the new rows
        TokenizedDataModule(root)
