"""Evaluation: analytic metrics for generated images."""
from .detector import ShapesDetector
from .shapes_score import ShapesScore, chance_level, score_prompt

__all__ = ["ShapesDetector", "ShapesScore", "chance_level", "score_prompt"]
