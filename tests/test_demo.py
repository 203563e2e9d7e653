"""The demo pieces: ShapesEvaluator in validation and `starkit test`, eval_shapes.py, GridWriter, and the demo
recipes chained (tokenizer -> generator -> sampler head -> export -> eval), all on CPU."""
import glob
import json
import os
import pathlib
import sys
import tempfile

import lightning as L
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, make_tiny_generator
from starkit.callbacks import GridWriter, ShapesEvaluator
from starkit.cli import main
from starkit.data import ShapesDataModule
from starkit.data.shapes import SKILLS

sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def _trainer(tmp_path, callbacks, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks, **kw)


def test_evaluator_logs_val_scores_in_fit_and_validate(tmp_path):
    model = make_tiny_generator()
    dm = ShapesDataModule(resolution=32, batch_size=2, num_train=4, num_val=2)
    ev = ShapesEvaluator(num_prompts=6, batch_size=4, cfg=1.0)
    trainer = _trainer(tmp_path, [ev], fast_dev_run=1)
    trainer.fit(model, dm)
    assert "val/shapes_overall" in trainer.callback_metrics
    assert 0.0 <= float(trainer.callback_metrics["val/shapes_overall"]) <= 1.0
    assert ev.last_scores["val/shapes_num_samples"] == 6
    trainer = _trainer(tmp_path, [ev])
    out = trainer.validate(model, dm)[0]
    assert "val/shapes_overall" in out and "val/loss" in out
    # the prompts are the datamodule's held-out ones, and skills without prompts are not logged
    assert [c for c, _ in ev.prompts()] == [c for c, _ in dm.prompts("heldout", 6)]
    assert all(k.split("shapes_")[1] in SKILLS + ["overall", "num_samples"] for k in ev.last_scores)


def test_evaluator_images_do_not_depend_on_chunking(tmp_path):
    """Chunk j is seeded seed + j: the same prompts and seed give the same score twice."""
    model = make_tiny_generator()
    dm = ShapesDataModule(resolution=32, batch_size=2, num_val=2)
    a, b = ShapesEvaluator(num_prompts=8, batch_size=4), ShapesEvaluator(num_prompts=8, batch_size=4)
    scores = []
    for ev in (a, b):
        _trainer(tmp_path, [ev]).validate(model, dm, verbose=False)
        scores.append(ev.last_scores)
    assert scores[0] == scores[1]


def test_evaluator_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ShapesEvaluator(split="test")
    with pytest.raises(ValueError):
        ShapesEvaluator(num_prompts=0)


@pytest.fixture(scope="module")
def tiny_ckpt():
    # outside pytest's basetemp: tests/test_pipeline.py globs every last.ckpt under it for its own run
    tmp = tempfile.TemporaryDirectory(prefix="starkit_demo_")
    root = pathlib.Path(tmp.name)
    main(["fit", "--config", os.path.join(REPO, "recipes/generator/tiny.yaml"), "--trainer.max_steps=2",
          "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1", f"--trainer.default_root_dir={root}",
          "--data.init_args.num_train=8", "--data.init_args.num_val=4", "--data.init_args.batch_size=4",
          "--trainer.logger=false"])
    yield sorted(glob.glob(str(root / "**" / "last.ckpt"), recursive=True))[0]
    tmp.cleanup()


def test_starkit_test_reports_shapes_score(tiny_ckpt):
    with tempfile.TemporaryDirectory(prefix="starkit_demo_test_") as tmp:  # its config.yaml stays out of basetemp
        _starkit_test(tiny_ckpt, pathlib.Path(tmp))


def _starkit_test(tiny_ckpt, tmp_path):
    conf = tmp_path / "eval.yaml"
    conf.write_text("trainer:\n  callbacks:\n    - class_path: starkit.callbacks.ShapesEvaluator\n"
                    "      init_args: {seed: 0}\n")
    cli = main(["test", "--config", os.path.join(REPO, "recipes/generator/tiny.yaml"), "--config", str(conf),
                "--ckpt_path", tiny_ckpt, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                "--data.init_args.num_val=6", "--data.init_args.batch_size=4"])
    metrics = cli.trainer.callback_metrics
    assert "test/shapes_overall" in metrics and "test/loss" in metrics
    ev = [cb for cb in cli.trainer.callbacks if isinstance(cb, ShapesEvaluator)][0]
    assert ev.last_scores["test/shapes_num_samples"] == 6


def test_eval_shapes_script_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    import eval_shapes
    out = tmp_path / "eval.json"
    grid = tmp_path / "grid.png"
    result = eval_shapes.main([tiny_model_dir, "--num", "6", "--seeds", "0,1", "--batch-size", "4",
                               "--json", str(out), "--save-grid", str(grid)])
    names = [name for name, _ in result["rows"]]
    assert names == ["seed 0", "seed 1", "mean"]
    for _, scores in result["rows"]:
        assert {"overall", "num_samples", *SKILLS} <= set(scores)
    assert result["rows"][0][1]["num_samples"] == 6
    printed = capsys.readouterr().out
    assert "| run | overall |" in printed and "| mean |" in printed
    assert json.loads(out.read_text())["num"] == 6
    assert Image.open(grid).size[0] > 0
    # --sampler parallel on a model saved with a ParallelSampler keeps its settings
    assert eval_shapes.sampler_config(tiny_model_dir, "parallel")["class_path"] == "starkit.samplers.ParallelSampler"
    assert eval_shapes.sampler_config(tiny_model_dir, "saved") is None


def test_grid_writer_in_predict(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    main(["predict", "--config", os.path.join(REPO, "recipes/predict/demo.yaml"),
          f"--model.init_args.path={tiny_model_dir}", '--data.init_args.prompts=["a red circle", "two blue squares"]',
          "--data.init_args.num_images_per_prompt=4", f"--data.init_args.output_dir={out}",
          f"--trainer.callbacks.init_args.output_dir={out}"])
    assert len(glob.glob(str(out / "*.png"))) == 8
    grid = Image.open(str(out) + "_grid.png")
    # 32 px images, 4 per row (one row per prompt, not a square-ish 3 x 3), 2 px padding
    assert grid.size == (4 * 34 + 2, 2 * 34 + 2)


def test_grid_writer_grid_layout():
    gw = GridWriter(padding=1, pad_value=0)
    images = torch.full((5, 3, 4, 4), 255, dtype=torch.uint8)
    grid = gw.grid(images, nrow=2)
    assert grid.shape == (3, 3 * 5 + 1, 2 * 5 + 1)
    assert grid[:, 1:5, 1:5].min() == 255 and grid[:, 0].max() == 0


@pytest.mark.slow
def test_demo_recipes_chain_on_cpu(monkeypatch):
    """The three demo stages find each other's checkpoints at their fixed paths; export and eval follow."""
    with tempfile.TemporaryDirectory(prefix="starkit_demo_chain_") as tmp:  # outside basetemp (see tiny_ckpt)
        monkeypatch.chdir(tmp)
        _chain(pathlib.Path(tmp))


def _chain(tmp_path):
    small = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_steps=2",
             "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--data.init_args.batch_size=2",
             "--data.init_args.num_workers=0", "--data.init_args.num_train=8", "--data.init_args.num_val=2"]

    def fit(stage):
        """The recipe's own callbacks, with a 4-prompt ShapesEvaluator and no image grids (CPU time)."""
        recipe = os.path.join(REPO, f"recipes/demo/{stage}.yaml")
        callbacks = []
        for cb in yaml.safe_load(open(recipe))["trainer"].get("callbacks", []):
            if cb["class_path"].endswith("ShapesEvaluator"):
                cb["init_args"].update(num_prompts=4, batch_size=4)
            if not cb["class_path"].endswith(("ImageGridLogger", "LearningRateMonitor")):
                callbacks.append(cb)
        conf = tmp_path / f"{stage}_callbacks.yaml"
        conf.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks, "logger": False}}))
        main(["fit", "--config", recipe, "--config", str(conf), *small])
        assert os.path.isfile(f"runs/demo/{stage}/last.ckpt")

    fit("tokenizer")
    fit("generator")
    fit("sampler_head")
    assert os.path.isfile("runs/demo/sampler_head/last.ckpt")
    main(["export", "runs/demo/sampler_head/last.ckpt", "models/demo", "--dtype", "fp16"])
    size = sum(os.path.getsize(p) for p in glob.glob("models/demo/**/*", recursive=True) if os.path.isfile(p))
    assert size < 25e6, size
    cfg = json.load(open("models/demo/starkit.json"))
    assert cfg["sampler"]["class_path"].endswith("StableSampler")
    assert cfg["text_encoder"]["init_args"]["name_or_path"] == "minilm"
    import eval_shapes
    result = eval_shapes.main(["models/demo", "--num", "4", "--seeds", "0", "--batch-size", "4"])
    assert result["rows"][0][1]["num_samples"] == 4


def test_model_dir_loads_with_another_sampler_and_refuses_a_partial_head():
    import eval_shapes
    from starkit.pipeline import load_generator
    demo = os.path.join(REPO, "models", "demo")  # saved with a StableSampler and its 1-block head
    parallel = load_generator(demo, sampler=eval_shapes.sampler_config(demo, "parallel"))
    assert type(parallel.sampler).__name__ == "ParallelSampler"
    stable = eval_shapes.sampler_config(demo, "stable")  # the saved settings, head depth included
    assert stable["init_args"]["head_depth"] == 1 and load_generator(demo, sampler=stable).sampler.head_ready
    deeper = {"class_path": "starkit.samplers.StableSampler", "init_args": {**stable["init_args"], "head_depth": 3}}
    with pytest.raises(RuntimeError, match="missing"):
        load_generator(demo, sampler=deeper)


def test_a_shallower_head_than_the_saved_one_is_refused(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from starkit.pipeline import load_generator
    demo = tmp_path / "demo"
    shutil.copytree(os.path.join(REPO, "models", "demo"), demo)
    weights = load_file(str(demo / "generator.safetensors"))  # give the saved head a second block
    weights.update({k.replace("blocks.0.", "blocks.1."): v.clone() for k, v in weights.items() if "head.blocks.0." in k})
    save_file(weights, str(demo / "generator.safetensors"))
    stable = {"class_path": "starkit.samplers.StableSampler",
              "init_args": {"causal_scales": 2, "steps": 4, "steps_last": 8, "random_steps": 2, "head_depth": 1}}
    with pytest.raises(RuntimeError, match="unexpected"):
        load_generator(str(demo), sampler=stable)


def test_ablation_configs_are_valid_recipes(tmp_path, capsys):
    import demo_ablation
    with open(os.path.join(REPO, "recipes/demo/generator.yaml")) as fh:
        base = yaml.safe_load(fh)
    cfg = demo_ablation.make_config(base, str(tmp_path), "learned", 1, 128, steps=100, max_minutes=2.5, lr=None,
                                    cache_dir=str(tmp_path / "cache"), workers=1, num_train=64)
    model = cfg["model"]["init_args"]
    assert model["positional"]["class_path"].endswith("LearnedAbsolutePE") and cfg["seed_everything"] == 1
    assert model["tokenizer"]["init_args"]["patch_nums"][-1] == 16 and cfg["data"]["init_args"]["resolution"] == 128
    assert model["init_from"].endswith(os.path.join("learned_s1_64", "last.ckpt"))
    assert cfg["trainer"]["max_time"] == "00:00:02:30" and cfg["trainer"]["max_steps"] == 100
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_info:  # jsonargparse validates every class_path and argument
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    assert "LearnedAbsolutePE" in capsys.readouterr().out
    rows = [{"variant": "rope", "seed": s, "res": r, "overall": 0.1 * (s + 1)} for s in (0, 1) for r in (64, 128)]
    assert "| rope | 10.0, 20.0 | 15.0 | 10.0, 20.0 | 15.0 |" in demo_ablation.ablation_table(rows)
