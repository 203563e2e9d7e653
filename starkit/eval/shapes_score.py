"""ShapesScore: a GenEval-style, analytic evaluator of images generated from shapes-world prompts.

Each prompt's ground truth (from :class:`starkit.data.ShapesDataModule`) says what its
caption requires: a list of groups ``{colour, shape, size, count}`` (None = any) and, for
position prompts, a relation between two groups. The analytic :class:`ShapesDetector`
finds the objects of the generated image, and the prompt passes when

* every required group is matched by exactly ``count`` detected objects (colour, shape and
  size compared only where the caption names them; this checks counting and the binding of
  colour to shape),
* the image holds no objects beyond those the prompt names (its captions describe whole
  scenes, so an extra object is an error),
* for position prompts, the centre of A is left of / right of / above / below the centre of
  B by at least ``position_margin`` of the image side.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torchmetrics import Metric

from starkit.data.shapes import SKILLS
from starkit.eval.detector import ShapesDetector

Truth = Union[str, dict]


def _matches(group: dict, obj: dict) -> bool:
    if obj["colour"] is None or obj["shape"] == "unknown":  # not an object of the world
        return False
    return all(group[k] is None or group[k] == obj[k] for k in ("colour", "shape", "size"))


def score_prompt(truth: dict, objects: Sequence[dict], position_margin: float = 0.05) -> bool:
    """Whether detected ``objects`` satisfy a prompt's ground truth (see the module doc).

    Args:
        truth: the prompt's ground truth (``require`` and ``relation`` are read).
        objects: detected (or ground-truth) objects with ``colour``, ``shape``, ``size``, ``center``.
        position_margin: minimal centre offset, in image units, for a relation to hold.
    """
    require = truth["require"]
    if len(objects) != sum(g["count"] for g in require):
        return False
    matched = []
    for group in require:
        hits = [o for o in objects if _matches(group, o)]
        if len(hits) != group["count"]:
            return False
        matched.append(hits)
    relation = truth.get("relation")
    if relation:
        (ax, ay), (bx, by) = matched[relation["a"]][0]["center"], matched[relation["b"]][0]["center"]
        offset = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation["rel"]]
        return offset >= position_margin
    return True


def to_uint8(images: torch.Tensor, input_range: str = "-1,1") -> np.ndarray:
    """``(B, 3, H, W)`` tensor -> ``(B, H, W, 3)`` uint8 array.

    uint8 tensors are taken as 0..255; float tensors as ``input_range`` ("-1,1" or "0,1").
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.detach().to("cpu")
    if x.dtype != torch.uint8:
        x = x.float()
        if input_range == "-1,1":
            x = (x + 1.0) * 127.5
        elif input_range == "0,1":
            x = x * 255.0
        else:
            raise ValueError(f"input_range must be '-1,1' or '0,1', got {input_range!r}")
        x = x.clamp(0, 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


class ShapesScore(Metric):
    """GenEval-style accuracy of generated images against shapes-world prompts.

    ``update(images, truths)`` takes images ``(B, 3, H, W)``, floats in [-1, 1] by default
    (see ``input_range``) or uint8 in 0..255, and one ground truth per image (the JSON
    strings of a batch's ``objects`` or the dicts of ``ShapesDataModule.prompts``).
    ``compute()`` returns ``overall`` (fraction of all prompts passed), the accuracy per
    skill (NaN for a skill with no prompts) and ``num_samples``.

    Args:
        input_range: range of float images, "-1,1" (the kit's convention) or "0,1".
        position_margin: minimal centre offset (image units) for a relation to hold.
        detector: the analytic detector (default thresholds when None).
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, input_range: str = "-1,1", position_margin: float = 0.05,
                 detector: Optional[ShapesDetector] = None, **kwargs):
        super().__init__(**kwargs)
        if input_range not in ("-1,1", "0,1"):
            raise ValueError(f"input_range must be '-1,1' or '0,1', got {input_range!r}")
        self.input_range, self.position_margin = input_range, position_margin
        self.detector = detector or ShapesDetector()
        self.add_state("correct", default=torch.zeros(len(SKILLS), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(SKILLS), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, truths: Sequence[Truth]) -> None:
        """Detect the objects of each image and score it against its prompt's ground truth."""
        if len(truths) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(truths)} ground truths")
        detections = self.detector(to_uint8(images, self.input_range))
        correct = torch.zeros(len(SKILLS), dtype=torch.long)
        total = torch.zeros(len(SKILLS), dtype=torch.long)
        for truth, objects in zip(truths, detections):
            truth = json.loads(truth) if isinstance(truth, str) else truth
            k = SKILLS.index(truth["skill"])
            total[k] += 1
            correct[k] += int(score_prompt(truth, objects, self.position_margin))
        self.correct += correct.to(self.correct.device)
        self.total += total.to(self.total.device)

    def compute(self) -> Dict[str, torch.Tensor]:
        """``overall``, one accuracy per skill and ``num_samples``."""
        correct, total = self.correct.float(), self.total.float()
        out = {"overall": correct.sum() / total.sum().clamp(min=1)}
        for k, skill in enumerate(SKILLS):
            out[skill] = correct[k] / total[k] if total[k] > 0 else torch.tensor(float("nan"))
        out["num_samples"] = self.total.sum()
        return out


def chance_level(truths: List[dict], objects: List[List[dict]], position_margin: float = 0.05) -> float:
    """Fraction of all (prompt i, scene j != i) pairs in which scene j's objects satisfy
    prompt i: the accuracy a perfect detector would get on randomly re-paired prompts."""
    hits = sum(score_prompt(t, o, position_margin) for i, t in enumerate(truths)
               for j, o in enumerate(objects) if i != j)
    n = len(truths)
    return hits / float(n * (n - 1))
