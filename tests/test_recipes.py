"""Every recipe opens with the command that runs it, that command parses as written (--print_config, the recipe's
own sizes and data), and the recipe runs for a step on CPU with tiny overrides."""
import contextlib
import glob
import io
import os
import re
import shlex

import pytest
import torch

from conftest import REPO
from starkit.cli import main

RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"), recursive=True))
OVERRIDES = {"tokenizer": "tests/conf/tiny_tokenizer_overrides.yaml",
             "generator": "tests/conf/tiny_generator_overrides.yaml",
             "demo": "tests/conf/tiny_demo_overrides.yaml",
             "demo/tokenizer.yaml": "tests/conf/tiny_demo_tokenizer_overrides.yaml"}  # a recipe's own entry wins


def family(path):
    rel = os.path.relpath(path, os.path.join(REPO, "recipes"))
    return rel.split(os.sep)[0], rel


def test_there_are_recipes_for_every_stage():
    families = {family(p)[0] for p in RECIPES}
    assert {"tokenizer", "generator", "predict"} <= families


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: family(p)[1])
def test_recipe_opens_with_its_command(recipe):
    with open(recipe) as fh:
        first = fh.readline()
    rel = os.path.relpath(recipe, REPO)
    assert first.startswith("# starkit ") and rel in first, f"{rel}: first line must be '# starkit ... --config {rel} ...'"


def test_every_recipe_is_run_by_a_test():
    """A recipe in a new folder must get its overrides (or be a predict recipe), not be skipped silently."""
    assert all(family(p)[0] in OVERRIDES or family(p)[0] == "predict" for p in RECIPES)


def first_line_argv(recipe):
    """The command of a recipe's first line as argv (without 'starkit'); '<model dir>'-style placeholders filled."""
    with open(recipe) as fh:
        first = fh.readline()
    return shlex.split(re.sub(r"<[^>]+>", "placeholder", first.lstrip("#").strip()))[1:]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: family(p)[1])
def test_recipe_command_parses_as_written(recipe, monkeypatch):
    """The first line's command, run from the repository root with --print_config: every field of the recipe
    (its own sizes, data module and placeholders, which the CPU run below replaces) and every flag of the
    command are accepted by the real classes."""
    monkeypatch.chdir(REPO)
    argv = first_line_argv(recipe)
    assert argv[0] in {"fit", "validate", "test", "predict"} and argv[1:3] == ["--config", os.path.relpath(recipe, REPO)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(argv + ["--print_config"])
    assert done.value.code in (0, None), out.getvalue()[-2000:]
    assert "class_path: " in out.getvalue()


@pytest.mark.parametrize("recipe", [p for p in RECIPES if family(p)[0] in OVERRIDES], ids=lambda p: family(p)[1])
def test_training_recipe_runs_a_step_on_cpu(recipe, tmp_path):
    kind = family(recipe)[0]
    with open(recipe) as fh:
        subcommand = fh.readline().split()[2]  # "# starkit fit --config ..."
    main([subcommand, "--config", recipe, "--config", os.path.join(REPO, OVERRIDES.get(family(recipe)[1], OVERRIDES[kind])),
          "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}"])


@pytest.mark.parametrize("recipe", [p for p in RECIPES if family(p)[0] == "predict"], ids=lambda p: family(p)[1])
def test_predict_recipe_writes_images(recipe, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    fast = ["--model.init_args.cuda_graphs=whole", "--model.init_args.compile_blocks=true",
            "--model.init_args.fp8=true"] if "tiny" in recipe else []
    main(["predict", "--config", recipe, f"--model.init_args.path={tiny_model_dir}", "--trainer.accelerator=cpu", *fast,
          "--trainer.precision=32-true", "--data.init_args.prompt_file=null",
          '--data.init_args.prompts=["a red circle", "two blue squares"]', "--data.init_args.num_images_per_prompt=1",
          f"--data.init_args.output_dir={out}", f"--trainer.callbacks.init_args.output_dir={out}"])
    assert sorted(os.listdir(out)) == ["000000_00.json", "000000_00.png", "000001_00.json", "000001_00.png"]


def test_pretrained_generator_passes_its_generate_options_to_prediction(tiny_model_dir):
    from starkit.pipeline import _load_pretrained
    gen = _load_pretrained(tiny_model_dir, cuda_graphs=True, compile_blocks=True)
    out = gen.predict_step({"prompt": ["a red circle"], "seed": [3]}, 0)
    assert out["images"].shape[0] == 1 and "_static_steps" in gen.__dict__  # the static steps were used
    plain = _load_pretrained(tiny_model_dir)
    assert plain.predict_options == {"cuda_graphs": False, "compile_blocks": False, "fp8": False}
    assert torch.equal(plain.predict_step({"prompt": ["a red circle"], "seed": [3]}, 0)["images"], out["images"])


def test_pretrained_generator_accepts_the_whole_generation_graph(tiny_model_dir):
    """cuda_graphs: whole (YAML) predicts through WholeGenerationGraph with the per-step path's images; a wrong
    value is refused with the accepted ones named."""
    from starkit.pipeline import _load_pretrained
    whole = _load_pretrained(tiny_model_dir, cuda_graphs="whole")
    out = whole.predict_step({"prompt": ["a red circle", "two blue squares"], "seed": [3, 4]}, 0)
    assert "whole" in whole.__dict__["_static_steps"]
    steps = _load_pretrained(tiny_model_dir, cuda_graphs=True)
    assert torch.equal(steps.predict_step({"prompt": ["a red circle", "two blue squares"], "seed": [3, 4]}, 0)["images"],
                       out["images"])
    with pytest.raises(ValueError, match="cuda_graphs must be false, true .* or 'whole'"):
        _load_pretrained(tiny_model_dir, cuda_graphs="all")
