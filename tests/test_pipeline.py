"""fit -> checkpoint -> load_from_checkpoint -> predict (CLI) and export -> StarPipeline -> images."""
import glob
import json
import os

import pytest
import torch
from PIL import Image

from conftest import REPO
from starkit import StarPipeline
from starkit.cli import main


def test_pipeline_from_model_directory_generates_reproducible_images(tiny_model_dir):
    pipe = StarPipeline.from_pretrained(tiny_model_dir)
    images = pipe(["a red circle", "two blue squares", "a green star"], seed=7, batch_size=2)
    assert len(images) == 3 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
    again = pipe(["a red circle", "two blue squares", "a green star"], seed=7, batch_size=2)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    with pytest.raises(ValueError, match="empty"):
        pipe([])
    # one seed per prompt: the same images whatever the batching
    per_prompt = pipe(["a red circle", "two blue squares", "a green star"], seed=[3, 4, 5], batch_size=2)
    one_batch = pipe(["a red circle", "two blue squares", "a green star"], seed=[3, 4, 5], batch_size=3)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(per_prompt, one_batch))
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        pipe(["a", "b", "c"], seed=[1, 2])


def test_save_pretrained_round_trip_keeps_outputs(tiny_model_dir, tmp_path):
    pipe = StarPipeline.from_pretrained(tiny_model_dir)
    pipe.save_pretrained(str(tmp_path / "copy"))
    other = StarPipeline.from_pretrained(str(tmp_path / "copy"))
    a, b = pipe("a red circle", seed=1)[0], other("a red circle", seed=1)[0]
    assert a.tobytes() == b.tobytes()


def test_not_a_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="starkit export"):
        StarPipeline.from_pretrained(str(tmp_path))


def test_checkpoint_reloads_and_predicts_through_the_cli(tmp_path, tiny_model_dir):
    run = os.path.dirname(tiny_model_dir)  # the fixture's own fit run
    ckpt = sorted(glob.glob(os.path.join(run, "**", "last.ckpt"), recursive=True))[0]
    from starkit.generator import ScaleWiseGenerator
    model = ScaleWiseGenerator.load_from_checkpoint(ckpt, weights_only=True)
    pipe = StarPipeline.from_pretrained(tiny_model_dir)
    assert torch.equal(model.generate(["a red circle"], seed=3), pipe.generator.generate(["a red circle"], seed=3))
    config = sorted(glob.glob(os.path.join(run, "**", "config.yaml"), recursive=True))
    out = tmp_path / "pred"
    args = ["predict", "--ckpt_path", ckpt, "--data=starkit.data.PromptDataModule",
            '--data.prompts=["a red circle", "a blue square", "a green star"]', f"--data.output_dir={out}",
            "--trainer.callbacks=starkit.callbacks.ImageWriter", f"--trainer.callbacks.output_dir={out}",
            "--trainer.logger=false"]
    main(["predict", "--config", config[0]] + args[1:]) if config else main(
        ["predict", "--config", os.path.join(REPO, "recipes/generator/tiny.yaml")] + args[1:])
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == ["000000_00.png", "000001_00.png", "000002_00.png"]
    meta = json.loads((out / "000001_00.json").read_text())
    assert meta["prompt"] == "a blue square" and meta["checkpoint"] and meta["settings"]["cfg"] == 2.0


def test_interrupted_prediction_resumes_without_overwriting(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    common = ["predict", "--config", os.path.join(REPO, "recipes/predict/tiny.yaml"),
              f"--model.init_args.path={tiny_model_dir}", "--trainer.accelerator=cpu",
              f"--data.init_args.output_dir={out}", f"--trainer.callbacks.init_args.output_dir={out}",
              "--data.init_args.num_images_per_prompt=1", "--data.init_args.batch_size=1"]
    main(common + ['--data.init_args.prompts=["a red circle", "two blue squares"]'])
    marker = (out / "000000_00.png").read_bytes()
    os.remove(out / "000001_00.png")  # as if the run had been killed before writing it
    (out / "000000_00.png").write_bytes(marker + b"")  # unchanged content, must stay untouched
    mtime = os.path.getmtime(out / "000000_00.png")
    main(common + ['--data.init_args.prompts=["a red circle", "two blue squares"]'])
    assert os.path.exists(out / "000001_00.png")
    assert os.path.getmtime(out / "000000_00.png") == mtime


def test_image_writer_uses_the_data_modules_folder_and_refuses_another(tmp_path, tiny_model_dir):
    """The predict recipes set the folder once (the data module's output_dir); a writer set to another folder
    than the one the resume check reads is one clear error."""
    out = tmp_path / "mine"
    common = ["predict", "--config", os.path.join(REPO, "recipes/predict/tiny.yaml"),
              f"--model.init_args.path={tiny_model_dir}", "--trainer.accelerator=cpu",
              "--data.init_args.num_images_per_prompt=1", '--data.init_args.prompts=["a red circle"]']
    main(common + [f"--data.init_args.output_dir={out}"])
    assert sorted(os.listdir(out)) == ["000000_00.json", "000000_00.png"]
    with pytest.raises(ValueError, match="ImageWriter writes to .*other.* but the data module"):
        main(common + [f"--data.init_args.output_dir={out}", f"--trainer.callbacks.init_args.output_dir={tmp_path / 'other'}"])


def test_console_script_exits_zero_after_a_successful_run(tmp_path):
    import shutil
    import subprocess
    import sys
    exe = shutil.which("starkit")
    cmd = [exe] if exe else [sys.executable, "-c", "from starkit.cli import run; run()"]
    result = subprocess.run(cmd + ["fit", "--config", os.path.join(REPO, "recipes/generator/tiny.yaml"),
                                   "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
                                   "--data.init_args.num_train=8", "--data.init_args.num_val=2"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_failed_command_ends_with_its_cause_on_one_line(tmp_path):
    """jsonargparse's error ends in a dump of the whole config; the command's last line names the cause."""
    import subprocess
    import sys
    from starkit.cli import error_summary
    result = subprocess.run([sys.executable, "-m", "starkit", "fit", "--config",
                             os.path.join(REPO, "recipes/generator/tiny.yaml"), "--trainer.fast_dev_run=1",
                             "--model.init_args.tokenizer.init_args.pretrained=nope/vae_ch160v4096z32.pth"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("starkit: error: no tokenizer weights at 'nope/vae_ch160v4096z32.pth'")
    assert "FoundationVision/var" in last
    assert error_summary(ValueError("bad value\nmore")) == "ValueError: bad value"


def test_python_m_starkit_help_names_the_command(tmp_path):
    """``python -m starkit ... --model.help X``: the usage line says ``starkit``, not ``__main__.py``."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "starkit", "fit", "--model.help", "ScaleWiseGenerator"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: starkit ") and "__main__" not in result.stdout


@pytest.mark.parametrize("slot, class_path, message", [
    ("text_encoder", "os.system", "is a builtin_function_or_method, not a class"),
    ("text_encoder", "subprocess.Popen", "is not a starkit.text.base.TextEncoder"),
    ("sampler", "starkit.text.RandomTextEncoder", "is not a starkit.samplers.base.ScaleSampler"),
    ("positional", "collections.OrderedDict", "is not a starkit.positional.base.PositionalEncoding"),
    ("text_encoder", "no_such_package.Encoder", "cannot import 'no_such_package'"),
])
def test_a_model_directory_names_only_classes_of_the_right_kind(tiny_model_dir, tmp_path, slot, class_path, message):
    """A model directory may come from anyone: what its starkit.json names is checked before anything is built
    (a function such as os.system, or a class of another kind, is refused with one error naming the slot)."""
    import json
    import shutil

    from starkit.pipeline import load_generator
    from starkit.utils.class_path import build_from_config
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "starkit.json").read_text())
    cfg[slot] = {"class_path": class_path, "init_args": {"args": "echo hostile > pwned.txt", "shell": True}
                 if class_path == "subprocess.Popen" else {}}
    (model / "starkit.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"starkit.json: {slot}: .*{message}"):
        load_generator(str(model))
    assert not (tmp_path / "pwned.txt").exists() and not os.path.exists("pwned.txt")
    from starkit.samplers import ScaleSampler, StableSampler
    assert type(build_from_config({"class_path": "StableSampler"}, ScaleSampler)) is StableSampler  # short names
    with pytest.raises(ValueError, match=r"nested\.init_args\.inner: 'subprocess.Popen' is not a torch.nn"):
        build_from_config({"class_path": "torch.nn.Sequential", "init_args": {"inner": {
            "class_path": "subprocess.Popen", "init_args": {"args": "true"}}}}, what="nested")
