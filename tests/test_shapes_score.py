"""ShapesScore: right on ground-truth renders, ~0 on noise, low on shuffled prompts, inside Lightning.

Thresholds: >= 0.99 on 200 held-out renders at 64 px; <= 0.1 on uniform noise; shuffled
prompts at least 0.5 below the ground-truth score (measured ~0.03, chance ~0.04).
"""
import json

import lightning as L
import numpy as np
import torch

from starkit.data.shapes import SKILLS, ShapesDataModule, ShapesWorld
from starkit.eval import ShapesScore, score_prompt


def _renders(n, resolution=64, split="heldout"):
    world = ShapesWorld(resolution)
    renders = [world.render(i, split) for i in range(n)]
    images = torch.from_numpy(np.stack([np.asarray(r[0]) for r in renders])).permute(0, 3, 1, 2)  # (B, 3, R, R) uint8
    return images, [r[2] for r in renders]


def test_ground_truth_renders_score_high():
    images, truths = _renders(200)
    metric = ShapesScore()
    metric.update(images.float() / 127.5 - 1, [json.dumps(t) for t in truths])
    result = metric.compute()
    assert set(result) == {"overall", "num_samples", *SKILLS}
    assert int(result["num_samples"]) == 200
    assert result["overall"] >= 0.99, result


def test_input_ranges_agree():
    images, truths = _renders(16)
    a, b, c = ShapesScore(), ShapesScore(input_range="0,1"), ShapesScore()
    a.update(images.float() / 127.5 - 1, truths)
    b.update(images.float() / 255, truths)
    c.update(images, truths)
    assert a.compute()["overall"] == b.compute()["overall"] == c.compute()["overall"] == 1.0


def test_noise_and_shuffled_prompts_score_low():
    images, truths = _renders(200)
    noise = ShapesScore()
    noise.update(torch.rand(200, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1, truths)
    assert noise.compute()["overall"] <= 0.1
    shuffled = ShapesScore()
    order = np.random.default_rng(0).permutation(200)
    shuffled.update(images, [truths[j] for j in order])
    assert shuffled.compute()["overall"] <= 0.5


def test_score_prompt_rules():
    truth = ShapesWorld(64).scene(0, "train")
    assert score_prompt(truth, truth["objects"])
    assert not score_prompt(truth, truth["objects"] + [dict(truth["objects"][0])])  # an extra object fails
    assert not score_prompt(truth, [])


class _Echo(L.LightningModule):
    """'Generates' by returning the ground-truth image, and evaluates it with ShapesScore."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.score = ShapesScore()

    def validation_step(self, batch, batch_idx):
        self.score.update(batch["image"], batch["objects"])

    def on_validation_epoch_end(self):
        self.log_dict({f"val/shapes_{k}": v.float() for k, v in self.score.compute().items()})
        self.score.reset()


def test_inside_lightning_validation_loop():
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(_Echo(), datamodule=ShapesDataModule(batch_size=16, num_val=64))
    assert trainer.callback_metrics["val/shapes_overall"] >= 0.99
    assert trainer.callback_metrics["val/shapes_num_samples"] == 32
