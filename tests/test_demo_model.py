"""The shipped demo model (models/demo): size and format, the README's quick-start command, and its
ShapesScore on a fixed prompt set against the figure measured when it was committed (docs/demo.md)."""
import glob
import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import REPO
from starkit.cli import main

DEMO = os.path.join(REPO, "models", "demo")
# Measured on CPU (2 cores, torch 2.13) when the model was committed: 128 held-out prompts, sampling seed 0,
# the saved StableSampler: 22.7 % (`python benchmarks/eval_shapes.py models/demo --num 128 --seeds 0 --device cpu`).
# CPU kernels differ between machines, which changes some samples: the margin is 5 points (6 prompts). Without
# guidance (cfg 0) the same prompts score 15.6 %, below the floor: a broken guidance path fails this test.
MEASURED, MARGIN = 0.227, 0.05


def test_demo_model_is_small_fp16_and_documented():
    files = [f for f in glob.glob(os.path.join(DEMO, "**", "*"), recursive=True) if os.path.isfile(f)]
    assert sum(os.path.getsize(f) for f in files) < 25e6
    for path in glob.glob(os.path.join(DEMO, "**", "*.safetensors"), recursive=True):
        with safe_open(path, "pt") as fh:
            dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
        assert dtypes <= {"F16", "I64", "BOOL"}, (path, dtypes)
    provenance = open(os.path.join(DEMO, "PROVENANCE.md")).read()
    assert "train_demo.sh" in provenance and "commit" in provenance


def test_demo_model_scores_on_fixed_prompts():
    from starkit.data.shapes import ShapesWorld
    from starkit.eval import ShapesScore
    from starkit.pipeline import StarPipeline
    pipe = StarPipeline.from_pretrained(DEMO, device="cpu")
    world = ShapesWorld(64, seed=0)
    truths = [world.scene(i, "heldout") for i in range(128)]
    metric = ShapesScore(input_range="0,1")
    with torch.no_grad():
        for b, start in enumerate(range(0, 128, 64)):  # the batches and seeds of benchmarks/eval_shapes.py
            chunk = truths[start:start + 64]
            images = pipe.generator.generate([t["caption"] for t in chunk], seed=b)
            metric.update(images.float().clamp(0, 1), chunk)
    overall = float(metric.compute()["overall"])
    assert overall >= MEASURED - MARGIN, f"ShapesScore {overall:.3f} < {MEASURED} - {MARGIN}"


def test_readme_quick_start_command(tmp_path):
    out = tmp_path / "demo"
    prompts = ["a red circle to the left of a blue square", "two green triangles"]
    main(["predict", "--config", os.path.join(REPO, "recipes/predict/demo.yaml"),
          f"--data.init_args.prompts={json.dumps(prompts)}", f"--data.init_args.output_dir={out}",
          f"--trainer.callbacks.init_args.output_dir={out}"])
    assert len(glob.glob(str(out / "*.png"))) == 2 * 4
    assert os.path.exists(str(out) + "_grid.png")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_demo_model_accepts_the_empty_prompt(prompt):
    from starkit.pipeline import StarPipeline
    images = StarPipeline.from_pretrained(DEMO, device="cpu")([prompt], seed=0)
    assert len(images) == 1


def test_demo_model_with_static_scale_steps_draws_the_same_images():
    import numpy as np

    from starkit.pipeline import StarPipeline
    pipe = StarPipeline.from_pretrained(DEMO, device="cpu")  # its saved StableSampler, with the trained head
    plain = pipe(["a red circle", "two blue squares"], seed=0)
    static = pipe(["a red circle", "two blue squares"], seed=0, cuda_graphs=True)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, static))
