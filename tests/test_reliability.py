"""Reliability and security: every failure a user can cause is caught early with one clear
message, and no fault loses work (docs/reliability.md lists each case and its test)."""
import csv
import glob
import json
import os

import lightning as L
import pytest
import torch

from conftest import REPO, make_tiny_generator, make_tiny_tokenizer
from starkit.callbacks import DataHealthLogger, NonFiniteGuard, NonFiniteLossError
from starkit.cli import StarkitCLI, main
from starkit.utils import AtomicCheckpointIO, UnsafeCheckpointError
from starkit.utils.checkpoint_io import component_mismatches

TINY = os.path.join(REPO, "recipes/generator/tiny.yaml")
QUICK = ["--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--trainer.logger=false",
         "--trainer.callbacks=[]", "--data.init_args.num_train=4", "--data.init_args.num_val=2",
         "--data.init_args.batch_size=2"]


# ---------------------------------------------------------------------------- crafted pickles
class _Payload:
    """Unpickling this creates ``path``: the proof that a file's code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _evil_checkpoint(tmp_path, name="evil.ckpt"):
    sentinel = tmp_path / f"{name}.RAN"
    gen = make_tiny_generator()
    path = tmp_path / name
    torch.save({"state_dict": gen.state_dict(), "hyper_parameters": {"x": _Payload(sentinel)},
                "pytorch-lightning_version": L.__version__}, path)
    return str(path), sentinel


def test_crafted_pickle_is_refused_by_every_loader(tmp_path):
    from starkit.export import export_checkpoint
    from starkit.generator import ScaleWiseGenerator
    from starkit.tokenizers.weights import load_weights_file
    path, sentinel = _evil_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="unsafe unpickling"):  # tokenizer weights
        load_weights_file(path)
    with pytest.raises(Exception, match="Weights only load failed"):  # generator checkpoint
        ScaleWiseGenerator.load_from_checkpoint(path, weights_only=True)
    with pytest.raises(UnsafeCheckpointError, match="convert it once"):  # starkit export
        export_checkpoint(path, str(tmp_path / "out"))
    with pytest.raises(UnsafeCheckpointError, match="convert it once"):  # init_from (progressive resolution)
        make_tiny_generator(init_from=path)
    with pytest.raises(UnsafeCheckpointError, match="convert it once"):  # trainer resume (--ckpt_path)
        AtomicCheckpointIO().load_checkpoint(path)
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_resume_from_a_crafted_checkpoint_is_refused_through_the_cli(tmp_path):
    path, sentinel = _evil_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="(?s)refusing to load .*evil.ckpt.*weights_only=False"):
        main(["fit", "--config", TINY, *QUICK, "--trainer.fast_dev_run=false", "--trainer.max_steps=1",
              f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={path}"])
    assert not sentinel.exists()


# ---------------------------------------------------------------------------- atomic checkpoints
def test_atomic_checkpoint_io_keeps_the_old_file_when_a_write_dies(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), str(tmp_path / "ck" / "last.ckpt")
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def dying_save(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if killed mid-write
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path / "ck") == ["last.ckpt"]  # no temp file left behind


def test_cli_uses_atomic_checkpoint_io_by_default(tmp_path):
    cli = StarkitCLI(args=["--config", TINY, *QUICK, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---------------------------------------------------------------------------- config / load time
def test_patch_nums_that_do_not_fit_the_data_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)gives 32 px, not the data's 64 px.*last patch_num to 8"):
        main(["fit", "--config", TINY, *QUICK, "--data.init_args.resolution=64", f"--trainer.default_root_dir={tmp_path}"])
    with pytest.raises(ValueError, match="not the data's 64 px"):
        main(["fit", "--config", os.path.join(REPO, "recipes/tokenizer/tiny.yaml"), *QUICK,
              "--data.init_args.resolution=64", f"--trainer.default_root_dir={tmp_path}"])


def test_check_data_fits_model_reads_attribute_or_hparams():
    from starkit.callbacks.guards import check_data_fits_model
    gen = make_tiny_generator()

    class FolderData(L.LightningDataModule):
        resolution = 48
    check_data_fits_model(gen, None)  # nothing to check (e.g. prediction)
    with pytest.raises(ValueError, match="not the data's 48 px"):
        check_data_fits_model(gen, FolderData())
    FolderData.resolution = 32
    check_data_fits_model(gen, FolderData())
    check_data_fits_model(make_tiny_tokenizer(), FolderData())


def _save_ckpt(gen, path):
    torch.save({"state_dict": gen.state_dict(), "hyper_parameters": dict(gen.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return str(path)


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    from starkit.generator import ScaleWiseGenerator
    path = _save_ckpt(make_tiny_generator(), tmp_path / "tiny.ckpt")
    with pytest.raises(RuntimeError, match=r"(?s)does not match this generator's architecture.*missing keys: transformer.blocks.2"):
        ScaleWiseGenerator.load_from_checkpoint(path, depth=3, weights_only=True)
    with pytest.raises(RuntimeError, match="init_from: the source transformer does not fit.*blocks.2"):
        make_tiny_generator(depth=3, init_from=path)


def test_text_encoder_or_tokenizer_of_another_width_is_refused_at_load(tmp_path):
    from starkit.generator import ScaleWiseGenerator
    from starkit.text import RandomTextEncoder
    gen = make_tiny_generator()
    path = _save_ckpt(gen, tmp_path / "tiny.ckpt")
    with pytest.raises(RuntimeError, match=r"shape mismatches: .*encoder_proj.weight"):
        ScaleWiseGenerator.load_from_checkpoint(path, text_encoder=RandomTextEncoder(dim=48), weights_only=True)
    with pytest.raises(RuntimeError, match=r"shape mismatches: .*head_logits.weight"):
        ScaleWiseGenerator.load_from_checkpoint(path, tokenizer=make_tiny_tokenizer(codebook_size=32), weights_only=True)
    with pytest.raises(RuntimeError, match=r"does not fit.*encoder_proj.weight \(32, 32\) vs \(32, 48\)"):
        make_tiny_generator(text_encoder=RandomTextEncoder(dim=48), init_from=path)
    # the words for those shapes (for the messages of the three loaders)
    other = make_tiny_generator(text_encoder=RandomTextEncoder(dim=48), tokenizer=make_tiny_tokenizer(codebook_size=32))
    words = " | ".join(component_mismatches(other.state_dict(), gen.state_dict()))
    assert "text encoder of width 32; this text encoder has width 48" in words
    assert "codebook size 16; this tokenizer has 32" in words


def test_model_directory_is_verified_against_its_config(tmp_path):
    from starkit.pipeline import StarPipeline, save_model_dir
    save_model_dir(make_tiny_generator(), str(tmp_path / "m"))
    config = json.loads((tmp_path / "m" / "starkit.json").read_text())
    config["text_encoder"]["init_args"]["dim"] = 48  # starkit.json and the weights disagree
    (tmp_path / "m" / "starkit.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r"(?s)does not match the architecture in starkit.json.*encoder_proj"):
        StarPipeline.from_pretrained(str(tmp_path / "m"))
    save_model_dir(make_tiny_generator(), str(tmp_path / "n"))
    make_tiny_tokenizer(codebook_size=32).save_pretrained(str(tmp_path / "n" / "tokenizer"))  # another tokenizer
    with pytest.raises(RuntimeError, match=r"shape mismatches \[.*head_logits"):
        StarPipeline.from_pretrained(str(tmp_path / "n"))


def test_invalid_sampling_settings_fail_at_config_time(tmp_path):
    from starkit.samplers import ParallelSampler
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        ParallelSampler(top_k=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        main(["fit", "--config", TINY, *QUICK, "--model.init_args.sampler.init_args.top_p=1.5",
              f"--trainer.default_root_dir={tmp_path}"])
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        main(["fit", "--config", TINY, *QUICK, "--model.init_args.sampler.init_args.top_k=0",
              f"--trainer.default_root_dir={tmp_path}"])


def test_empty_prompt_list_is_one_clear_error(tmp_path):
    from starkit.data import PromptDataModule
    from starkit.pipeline import StarPipeline
    with pytest.raises(ValueError, match="prompt list is empty"):
        StarPipeline(make_tiny_generator())([])
    with pytest.raises(ValueError, match="no prompts found in the `prompts` list"):
        PromptDataModule(prompts=[]).setup("predict")


# ---------------------------------------------------------------------------- non-finite losses
class _Net(L.LightningModule):
    """y = w.x with a loss that turns NaN (or its gradient inf) at one step."""

    def __init__(self, bad_step=3, kind="nan"):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_step, self.kind = bad_step, kind

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if self.global_step == self.bad_step:
            loss = loss * float("nan") if self.kind == "nan" else loss + 0 * self.layer.weight.sum() * float("inf")
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g)), batch_size=4)


def _trainer(tmp_path, guard, steps=6):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_last=True,
                                               save_top_k=-1)
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[guard, ckpt], default_root_dir=str(tmp_path),
                     plugins=[AtomicCheckpointIO()])


def test_nonfinite_loss_stops_naming_the_step_and_last_checkpoint_stays_good(tmp_path):
    net = _Net(bad_step=3)
    trainer = _trainer(tmp_path, NonFiniteGuard("stop"))
    with pytest.raises(NonFiniteLossError, match=r"(?s)stopped at global step 3 .*the loss is nan"):
        trainer.fit(net)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # the last good step; nothing was written after the fault
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all(torch.isfinite(p).all() for p in net.parameters())
    for key, value in last["state_dict"].items():  # the bad update never reached the weights
        assert torch.equal(value, net.state_dict()[key])


@pytest.mark.parametrize("kind", ["nan", "inf_grad"])
def test_nonfinite_step_is_skipped_without_touching_weights_or_adam_state(tmp_path, kind):
    net, guard = _Net(bad_step=3, kind=kind), NonFiniteGuard("skip")
    with pytest.warns(UserWarning, match="at global step 3"):
        _trainer(tmp_path, guard).fit(net)
    assert guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())
    before = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=True)
    after = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=True)
    for key, value in before["state_dict"].items():  # no update, no weight decay in the skipped step
        assert torch.equal(after["state_dict"][key], value)
    assert after["optimizer_states"][0]["state"][0]["step"] == 3  # Adam's moments/step untouched
    assert torch.equal(after["optimizer_states"][0]["state"][0]["exp_avg"], before["optimizer_states"][0]["state"][0]["exp_avg"])


def test_skip_gives_up_after_too_many_faults_in_a_row(tmp_path):
    class AlwaysNaN(_Net):
        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).mean() * float("nan")
    with pytest.raises(NonFiniteLossError, match="3 faulty steps in a row"), pytest.warns(UserWarning):
        _trainer(tmp_path, NonFiniteGuard("skip", max_consecutive_skips=3)).fit(AlwaysNaN())


def test_guard_settings_are_checked():
    with pytest.raises(ValueError, match="'stop' or 'skip'"):
        NonFiniteGuard("ignore")


# ---------------------------------------------------------------------------- bad data is logged
def _bad_image_folder(root, n_good=6):
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        Image.new("RGB", (40, 36), (30 * i, 100, 200)).save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_text("a red circle")
    for i in range(2):
        (root / f"bad{i}.jpg").write_bytes(os.urandom(1500))
        (root / f"bad{i}.txt").write_text("noise")


@pytest.mark.parametrize("what", ["generator", "tokenizer"])
def test_skipped_samples_are_logged_during_training(tmp_path, what):
    from starkit.data import CaptionedImageDataModule
    _bad_image_folder(tmp_path / "images")
    model = make_tiny_generator() if what == "generator" else make_tiny_tokenizer()
    dm = CaptionedImageDataModule(root=str(tmp_path / "images"), resolution=32, batch_size=4, num_workers=0,
                                  val_size=0, pin_memory=False)
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path / "logs"))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[DataHealthLogger(every_n_steps=1)], default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)  # two bad images in the only epoch: it still completes
    assert trainer.current_epoch == 1
    with open(glob.glob(str(tmp_path / "logs" / "**" / "metrics.csv"), recursive=True)[0]) as fh:
        rows = list(csv.DictReader(fh))
    logged = [float(r["data/train/skipped/undecodable"]) for r in rows if r.get("data/train/skipped/undecodable")]
    assert logged and logged[-1] == 2.0
    assert any(float(r["data/skipped_total"]) == 2.0 for r in rows if r.get("data/skipped_total"))


def test_resumable_loader_is_left_in_place_by_lightning_under_ddp():
    from torch.utils.data import DistributedSampler

    from starkit.utils.resumable import ResumableDataLoader
    loader = ResumableDataLoader(list(range(10)), shuffle=True, seed=3, batch_size=2)
    # Lightning replaces a loader's sampler under DDP unless it already is a DistributedSampler
    assert isinstance(loader.sampler, DistributedSampler)
    loader.sampler.set_epoch(5)  # Lightning's per-epoch call is harmless
    first = [b.tolist() for b in loader]
    assert sorted(x for b in first for x in b) == list(range(10)) and first != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


# ---------------------------------------------------------------------------- wrong or broken files
def _broken_files(tmp_path):
    """An empty file, a checkpoint cut short (as by a crash mid-copy) and a text file, each named *.ckpt."""
    good = _save_ckpt(make_tiny_generator(), tmp_path / "good.ckpt")
    data = open(good, "rb").read()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.ckpt").write_text("learning rate 1e-3\n")
    return {"empty": (str(tmp_path / "empty.ckpt"), r"is empty \(0 bytes\).*earlier checkpoint"),
            "cut": (str(tmp_path / "cut.ckpt"), r"is truncated or damaged.*earlier checkpoint"),
            "text": (str(tmp_path / "notes.ckpt"), r"is a text file.*\.ckpt / \.pth file")}


def test_empty_truncated_or_text_checkpoints_are_named_not_called_unsafe(tmp_path):
    from starkit.convert import convert_var_vae
    from starkit.convert.common import NotACheckpointError, load_state_dict
    from starkit.export import export_checkpoint
    from starkit.tokenizers.weights import load_weights_file
    from starkit.utils.checkpoint_io import safe_torch_load
    for path, cause in _broken_files(tmp_path).values():
        with pytest.raises(NotACheckpointError, match=f"(?s)is not a training checkpoint: it {cause}"):
            export_checkpoint(path, str(tmp_path / "out"))
        with pytest.raises(NotACheckpointError, match=f"(?s)is not a VQVAE checkpoint: it {cause}"):
            convert_var_vae(path, str(tmp_path / "vae"))
        with pytest.raises(NotACheckpointError, match=f"(?s)is not a checkpoint: it {cause}"):
            load_state_dict(path)  # starkit convert star-t2i / var / star-sampler-head
        with pytest.raises(NotACheckpointError, match=f"(?s)is not a checkpoint: it {cause}"):
            safe_torch_load(path)  # Lightning's checkpoint loading through AtomicCheckpointIO
        with pytest.raises(NotACheckpointError, match=f"(?s)is not tokenizer weights: it {cause}"):
            load_weights_file(path)  # MultiScaleVQ(pretrained=...) / from_pretrained
    assert not (tmp_path / "out").exists() and not (tmp_path / "vae").exists()


def test_generator_weights_given_as_tokenizer_weights_are_named():
    tok = make_tiny_tokenizer()
    generator_sd = {f"transformer.{k}": v for k, v in make_tiny_generator().transformer.state_dict().items()}
    with pytest.raises(ValueError, match="generator's weights .*not a tokenizer's"):
        tok.load_tokenizer_weights(generator_sd)


def test_broken_checkpoint_given_to_the_cli_is_named(tmp_path):
    files = _broken_files(tmp_path)
    for what in ("empty", "cut"):
        path, cause = files[what]
        with pytest.raises(ValueError, match=f"(?s){what}.ckpt' is not a checkpoint \\(--ckpt_path\\): it {cause}"):
            main(["fit", "--config", TINY, *QUICK, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={path}"])
    path, cause = files["empty"]  # torch.load's bare EOFError became jsonargparse's IndexError
    with pytest.raises(ValueError, match=f"(?s)MultiScaleVQ\\(pretrained='.*empty.ckpt'\\).*it {cause}"):
        main(["fit", "--config", TINY, *QUICK, f"--trainer.default_root_dir={tmp_path}",
              f"--model.init_args.tokenizer.init_args.pretrained={path}"])
    with pytest.raises(ValueError, match=f"(?s)ScaleWiseGenerator\\(init_from='.*empty.ckpt'\\).*it {cause}"):
        main(["fit", "--config", TINY, *QUICK, f"--trainer.default_root_dir={tmp_path}",
              f"--model.init_args.init_from={path}"])


def test_tokenizer_checkpoint_where_a_generator_one_is_expected_and_back(tmp_path):
    from starkit.export import export_checkpoint
    tok = make_tiny_tokenizer()
    tok_ckpt = str(tmp_path / "tok.ckpt")  # as `starkit fit` writes it: the class path among the hyperparameters
    torch.save({"state_dict": tok.state_dict(), "pytorch-lightning_version": L.__version__,
                "hyper_parameters": {**dict(tok.hparams), "_class_path": "starkit.tokenizers.MultiScaleVQ",
                                     "_instantiator": "lightning.pytorch.cli.instantiate_module"}}, tok_ckpt)
    with pytest.raises(ValueError, match=r"(?s)is a checkpoint of starkit.tokenizers.MultiScaleVQ, not of a "
                                         r"ScaleWiseGenerator.*tokenizer.init_args.pretrained"):
        export_checkpoint(tok_ckpt, str(tmp_path / "out"))
    # Lightning would silently swap the recipe's model for the checkpoint's class, then fail on something else
    with pytest.raises(ValueError, match=r"(?s)is a checkpoint of starkit.tokenizers.MultiScaleVQ, but the "
                                         r"recipe's model is starkit.generator.ScaleWiseGenerator"):
        main(["fit", "--config", TINY, *QUICK, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={tok_ckpt}"])
    gen = make_tiny_generator()
    gen_ckpt = str(tmp_path / "gen.ckpt")
    torch.save({"state_dict": gen.state_dict(), "pytorch-lightning_version": L.__version__,
                "hyper_parameters": {"_class_path": "starkit.generator.ScaleWiseGenerator", "size": "tiny"}}, gen_ckpt)
    with pytest.raises(ValueError, match=r"(?s)is a checkpoint of starkit.generator.ScaleWiseGenerator, but the "
                                         r"recipe's model is starkit.tokenizers.MultiScaleVQ"):
        main(["fit", "--config", os.path.join(REPO, "recipes/tokenizer/tiny.yaml"), *QUICK,
              f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={gen_ckpt}"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_unusable_output_folder_fails_before_generating(tmp_path, where, monkeypatch):
    from starkit.callbacks import ImageWriter
    from starkit.data import PromptDataModule
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" if where == "a_file" else tmp_path / "a_file" / "images"
    gen = make_tiny_generator()
    monkeypatch.setattr(type(gen), "predict_step", lambda *a, **k: pytest.fail("generated before checking the folder"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[ImageWriter()],
                        default_root_dir=str(tmp_path))
    with pytest.raises(OSError, match="(?s)ImageWriter.*output folder.*--data.init_args.output_dir"):
        trainer.predict(gen, datamodule=PromptDataModule(prompts=["a red circle"], output_dir=str(out)))
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_atomic_writes_give_files_the_permissions_of_a_plain_open(tmp_path):
    """Images, model directories and checkpoints go through a temporary file and a rename; mkstemp's 0600 must not
    survive it (other users of a shared machine or a web server could not read the outputs)."""
    import stat
    from PIL import Image
    from starkit import StarPipeline
    from starkit.utils.checkpoint_io import AtomicCheckpointIO
    from starkit.utils.io import atomic_save_image, atomic_write_bytes
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")  # what open() gives under this process's umask
    atomic_write_bytes(str(tmp_path / "a.json"), b"{}")
    atomic_save_image(str(tmp_path / "a.png"), Image.new("RGB", (4, 4)))
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, str(tmp_path / "a.ckpt"))
    make_tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    StarPipeline(make_tiny_generator()).save_pretrained(str(tmp_path / "model"))
    files = [tmp_path / "a.json", tmp_path / "a.png", tmp_path / "a.ckpt"] + sorted((tmp_path / "tok").iterdir()) \
        + [f for f in (tmp_path / "model").rglob("*") if f.is_file()]
    mode = stat.S_IMODE(plain.stat().st_mode)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: mode for f in files}


@pytest.mark.parametrize("argv, message", [
    (["fit", "--config", "/no/such/recipe.yaml"], "File does not exist: '/no/such/recipe.yaml'"),
    (["fit", "--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
])
def test_a_command_line_error_is_not_buried_under_every_option(argv, message, capsys):
    """A bad command line prints a one-line usage, the --help tip and the error (jsonargparse printed ~50 lines of
    every option first); --help still lists the options."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "usage: starkit fit [--config CONFIG] [options]" and len(err) <= 4, err
    assert message in err[-1] and err[-1].startswith("error:")
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--trainer.max_steps" in capsys.readouterr().out


def test_nonfinite_guard_checks_once_per_optimizer_step_and_in_float32():
    """The guard keeps the losses of the backward passes and checks them with the gradients at the optimizer step
    (one host synchronisation per step, none after the forward); gradient norms in float32, so that large fp16
    gradients are not taken for infinite; a NaN loss of an earlier micro-batch is still found."""
    guard = NonFiniteGuard("stop")

    class _Opt:
        param_groups = [{"params": []}]
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    p.grad = torch.full((1000,), 300.0, dtype=torch.float16)  # norm 9487: inf in fp16, finite in float32
    module = torch.nn.Module()
    module.p = p
    _Opt.param_groups[0]["params"] = [p]

    class _Trainer:
        global_step, current_epoch, should_stop = 7, 0, False
        precision_plugin = None
        fit_loop = type("L", (), {"epoch_loop": type("E", (), {"batch_idx": 3})()})()
    for loss in (torch.tensor(1.0), torch.tensor(2.0)):
        guard.on_before_backward(_Trainer, module, loss)
    guard.on_before_optimizer_step(_Trainer, module, _Opt)  # finite: nothing happens
    assert p.grad is not None and guard._losses == []
    for loss in (torch.tensor(float("nan")), torch.tensor(2.0)):  # the first micro-batch's loss is NaN
        guard.on_before_backward(_Trainer, module, loss)
    with pytest.raises(NonFiniteLossError, match="global step 7 .*the loss is nan"):
        guard.on_before_optimizer_step(_Trainer, module, _Opt)
    assert p.grad is None  # the bad update never happens
