"""CaptionedImageDataModule: every bad-input case as a real file, counts, split, crops."""
import io
import json
import os
import warnings

import pytest
import torch
from PIL import Image

from starkit.data import CaptionedImageDataModule, load_rgb, var_transform
from starkit.data.captioned import scan_folder, split_items

R = 16  # tiny resolution keeps the tests fast


def _img(path, mode="RGB", size=(40, 30), color=None, **save_kwargs):
    color = color if color is not None else {"RGB": (200, 30, 30), "RGBA": (0, 0, 255, 0),
                                             "LA": (10, 128), "CMYK": (0, 255, 255, 0)}.get(mode, 100)
    img = Image.new(mode, size, color)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **save_kwargs)
    return path


def _jpeg_bytes(size=(64, 48)):
    buf = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _caption(path, text="a picture"):
    with open(os.path.splitext(path)[0] + ".txt", "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())


def _bad_folder(root):
    """Every bad-input case in one folder; returns the expected counts."""
    good = [_img(root / f"good/{i}.jpg", size=(40 + i, 30)) for i in range(4)]
    for path in good:
        _caption(path)
    (root / "bad").mkdir()
    (root / "bad/corrupt.jpg").write_bytes(os.urandom(2000))
    (root / "bad/truncated.jpg").write_bytes(_jpeg_bytes()[:600])
    (root / "bad/zero.jpg").write_bytes(b"")
    (root / "bad/text.jpg").write_text("this is not an image\n")
    _img(str(root / "bad/bomb.png"), size=(300, 300))  # > max_image_pixels=200*200 below
    _img(str(root / "bad/strip.png"), size=(400, 10))  # 40:1, extreme aspect ratio
    for name in ("corrupt", "truncated", "zero", "text", "bomb", "strip"):
        _caption(str(root / f"bad/{name}.jpg"))
    modes = root / "modes"
    _caption(_img(str(modes / "png_named.jpg"), format="PNG"))  # right bytes, wrong extension
    _caption(_img(str(modes / "gray.png"), "L"))
    _caption(_img(str(modes / "gray_alpha.png"), "LA"))
    _caption(_img(str(modes / "palette.png"), "P"))
    _caption(_img(str(modes / "palette_t.png"), "P", transparency=100))
    _caption(_img(str(modes / "rgba.png"), "RGBA"))
    _caption(_img(str(modes / "cmyk.jpg"), "CMYK"))
    _caption(_img(str(modes / "i16.png"), "I;16", color=40000))
    _caption(_img(str(modes / "tiny.png"), size=(8, 8)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    _caption(_img(str(modes / "rotated.jpg"), size=(40, 30), exif=exif))
    caps = root / "captions"
    _caption(_img(str(caps / "latin1.png")), "caf\xe9 au lait".encode("latin-1"))
    _caption(_img(str(caps / "empty.png")), "  \n")
    _img(str(caps / "missing.png"))  # no caption file at all
    (caps / "notes.md").write_text("not an image")
    skipped = {"undecodable": 3, "empty_file": 1, "too_large": 1, "extreme_aspect": 1}
    repaired = {"grayscale": 1, "alpha_composited": 3, "palette": 1, "cmyk": 1,
                "high_bit_depth": 1, "upscaled": 1, "exif_rotated": 1,
                "caption_not_utf8": 1, "caption_empty": 1, "caption_missing": 1}
    return skipped, repaired


def _dm(**kwargs):
    defaults = dict(resolution=R, batch_size=4, num_workers=0, val_size=0,
                    max_image_pixels=200 * 200, pin_memory=False)
    defaults.update(kwargs)
    return CaptionedImageDataModule(**defaults)


def _epoch(loader):
    batches = list(loader)
    for batch in batches:
        assert batch["image"].dtype == torch.float32
        assert batch["image"].shape[1:] == (3, R, R)
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert len(batch["caption"]) == len(batch["path"]) == batch["image"].shape[0]
    return batches


def test_whole_epoch_over_every_bad_case(tmp_path):
    skipped, repaired = _bad_folder(tmp_path)
    dm = _dm(root=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
        batches = _epoch(dm.train_dataloader())
    n = len(dm.train_dataset)
    assert n == 4 + 6 + 10 + 3  # every candidate image; notes.md is not one
    assert sum(b["image"].shape[0] for b in batches) == n  # bad ones replaced, not dropped
    paths = [p for b in batches for p in b["path"]]
    assert not any("/bad/" in p for p in paths)
    assert dm.train_dataset.stats == {"skipped": skipped, "repaired": repaired}
    counts = dm.skipped_counts()
    assert counts["index/missing_caption"] == 1
    assert counts["train/skipped/undecodable"] == 3
    assert counts["train/repaired/caption_not_utf8"] == 1
    # one warning per cause, not one per file
    messages = [str(w.message) for w in caught if "starkit.data" in str(w.message)]
    assert sum("(undecodable" in m for m in messages) == 1
    captions = dict(zip(paths, [c for b in batches for c in b["caption"]]))
    assert captions[str(tmp_path / "captions/latin1.png")] == "caf\ufffd au lait"
    assert captions[str(tmp_path / "captions/empty.png")] == ""
    assert captions[str(tmp_path / "captions/missing.png")] == ""
    # a second epoch counts the bad files again (counts are per request)
    _epoch(dm.train_dataloader())
    assert dm.train_dataset.stats["skipped"]["undecodable"] == 6


def test_counts_add_up_over_workers(tmp_path):
    skipped, _ = _bad_folder(tmp_path)
    dm = _dm(root=str(tmp_path), num_workers=2, persistent_workers=False)
    dm.setup("fit")
    _epoch(dm.train_dataloader())
    assert dm.train_dataset.stats["skipped"] == skipped


def test_skip_policies(tmp_path):
    _bad_folder(tmp_path)
    dm = _dm(root=str(tmp_path), min_size_policy="skip", missing_caption="skip")
    dm.setup("fit")
    _epoch(dm.train_dataloader())
    assert len(dm.train_dataset) == 4 + 6 + 10 + 2
    assert dm.train_dataset.stats["skipped"]["too_small"] == 1
    assert "upscaled" not in dm.train_dataset.stats["repaired"]
    assert dm.skipped_counts()["index/missing_caption"] == 1


def test_load_rgb_modes(tmp_path):
    rgba = _img(str(tmp_path / "a.png"), "RGBA", color=(0, 0, 0, 0))
    assert load_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # composited on white
    i16 = _img(str(tmp_path / "b.png"), "I;16", color=65535)
    assert load_rgb(i16).getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped
    i16 = _img(str(tmp_path / "c.png"), "I;16", color=32768)
    assert load_rgb(i16).getpixel((0, 0))[0] in (127, 128)
    rotated = tmp_path / "d.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _img(str(rotated), size=(40, 30), exif=exif)
    repairs = []
    assert load_rgb(str(rotated), repairs=repairs).size == (30, 40)
    assert repairs == ["exif_rotated"]


def test_all_unreadable_folder_is_one_clear_error(tmp_path):
    for i in range(20):
        (tmp_path / f"{i:02d}.jpg").write_text("not an image")
    with pytest.raises(RuntimeError, match=r"none of the first 16 of 20 .*undecodable x 16"):
        _dm(root=str(tmp_path)).setup("fit")


def test_folder_without_images_is_one_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no images found in folder .*\.txt x 1"):
        _dm(root=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _dm(root=str(tmp_path / "nope")).setup("fit")


def test_jsonl_manifest(tmp_path):
    _img(str(tmp_path / "imgs/a.png"))
    _img(str(tmp_path / "imgs/b.jpg"))
    absolute = _img(str(tmp_path / "elsewhere/c.png"))
    lines = [
        json.dumps({"image": "imgs/a.png", "caption": "first"}),
        "",
        json.dumps({"image": "imgs/b.jpg"}),  # missing caption -> ""
        json.dumps({"image": absolute, "caption": "third"}),
        "{not json",
        json.dumps({"caption": "no image key"}),
        json.dumps({"image": "imgs/gone.png", "caption": "file missing"}),
    ]
    manifest = tmp_path / "meta/../train.jsonl"
    os.makedirs(tmp_path / "meta")
    manifest.write_text("\n".join(lines) + "\n")
    dm = _dm(manifest=str(manifest))
    dm.setup("fit")
    batches = _epoch(dm.train_dataloader())
    captions = sorted(c for b in batches for c in b["caption"])
    assert sorted(set(captions)) == ["", "first", "third"]
    assert sum(b["image"].shape[0] for b in batches) == 4
    counts = dm.skipped_counts()
    assert counts["index/bad_manifest_line"] == 2
    assert counts["index/missing_caption"] == 1
    assert counts["train/skipped/missing_file"] == 1


def test_split_is_deterministic_and_order_free(tmp_path):
    names = [f"{i:03d}.png" for i in range(40)]
    for folder, order in (("a", names), ("b", names[::-1])):
        for name in order:
            _img(str(tmp_path / folder / name), size=(20, 20))
    splits = {}
    for folder in ("a", "b"):
        items, _, _ = scan_folder(str(tmp_path / folder), "empty")
        train, val = split_items(items, 0.1, None, seed=0)
        assert len(val) == 4 and len(train) == 36
        assert not {i.key for i in train} & {i.key for i in val}
        splits[folder] = sorted(i.key for i in val)
    assert splits["a"] == splits["b"]
    items, _, _ = scan_folder(str(tmp_path / "a"), "empty")
    assert sorted(i.key for i in split_items(items, 0.1, None, seed=1)[1]) != splits["a"]
    assert len(split_items(items, 0.0, 7, seed=0)[1]) == 7  # val_size wins
    dm = _dm(root=str(tmp_path / "a"), val_fraction=0.1, val_size=None)
    dm.setup("fit")
    assert sorted(os.path.basename(i.key) for i in dm.val_dataset.items) == splits["a"]


def test_train_random_crop_and_val_centre_crop(tmp_path):
    img = Image.effect_noise((64, 32), 60).convert("RGB")
    train, val = var_transform(R, train=True), var_transform(R, train=False)
    torch.manual_seed(0)
    crops = [train(img) for _ in range(8)]
    centre = [val(img) for _ in range(2)]
    for x in crops + centre:
        assert x.shape == (3, R, R) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(centre[0], centre[1])
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    # the centre crop is the middle of the short-side-resized image (18 x 36 here)
    mid = img.resize((36, 18), Image.LANCZOS).crop((10, 1, 26, 17))
    expected = torch.tensor(list(mid.getdata()), dtype=torch.float32).view(R, R, 3)
    assert torch.allclose(centre[0], expected.permute(2, 0, 1) / 127.5 - 1.0)


def test_val_loader_and_bad_arguments(tmp_path):
    for i in range(10):
        _img(str(tmp_path / f"{i}.png"), size=(24, 20))
    dm = _dm(root=str(tmp_path), val_size=3)
    dm.setup("fit")
    val = _epoch(dm.val_dataloader())
    assert sum(b["image"].shape[0] for b in val) == 3
    with pytest.raises(ValueError, match="exactly one"):
        CaptionedImageDataModule()
    with pytest.raises(ValueError, match="missing_caption"):
        CaptionedImageDataModule(root=".", missing_caption="drop")


def test_fit_with_a_trainer_logs_the_counts(tmp_path):
    import lightning as L

    _bad_folder(tmp_path)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch["image"].mean((2, 3))).pow(2).mean()
            counts = self.trainer.datamodule.skipped_counts()
            self.log_dict({k: float(v) for k, v in counts.items()}, on_step=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(root=str(tmp_path), val_size=2)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path / "run"))
    trainer.fit(Tiny(), datamodule=dm)
    skipped = [dm.train_dataset.stats["skipped"], dm.val_dataset.stats["skipped"]]
    assert sum(sum(s.values()) for s in skipped) >= 6  # the val sanity check may count again
    logged = trainer.logged_metrics
    assert any(k.startswith("train/skipped/") and v > 0 for k, v in logged.items())


def test_symlinked_subfolders_are_scanned_once(tmp_path):
    # os.walk does not follow folder links: a data set assembled from linked folders was silently left out
    real, root = tmp_path / "disk2" / "part", tmp_path / "data"
    real.mkdir(parents=True)
    root.mkdir()
    _img(real / "x.jpg")
    _caption(real / "x.jpg")
    _img(root / "y.png")
    (root / "part1").symlink_to(real, target_is_directory=True)
    (root / "again").symlink_to(real, target_is_directory=True)  # the same folder twice: read once
    (root / "loop").symlink_to(root, target_is_directory=True)  # a link back up: no endless walk
    keys = [item.key for item in scan_folder(str(root), "empty")[0]]
    assert keys == ["again/x.jpg", "y.png"]


def test_the_pixel_limit_replaces_pillows_own(monkeypatch):
    """``max_image_pixels: null`` means no limit, and a limit above Pillow's decompression-bomb threshold
    (``Image.MAX_IMAGE_PIXELS``, ~179 M pixels raise) is honoured: Pillow's check would otherwise skip such images
    as too large whatever the setting; Pillow's setting is restored afterwards."""
    import io
    from PIL import Image
    from starkit.data.images import SampleError, decode_rgb
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 20, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels: over twice Pillow's limit here
    assert decode_rgb(data, "big.png", max_pixels=None).size == (20, 20)
    assert decode_rgb(data, "big.png", max_pixels=1000).size == (20, 20)
    with pytest.raises(SampleError, match="too_large: big.png is 20x20, over 300 pixels"):
        decode_rgb(data, "big.png", max_pixels=300)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(Image.DecompressionBombError):  # Pillow's own check is untouched outside
        Image.open(io.BytesIO(data))
