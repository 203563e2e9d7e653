"""VAR's sampler: every token of a scale drawn at once from the (guided) logits."""
from __future__ import annotations

from typing import Optional

import torch

from starkit.samplers.base import ScaleSampler, ScaleStep
from starkit.samplers.functional import (apply_guidance, candidates, draw, guidance_weight, gumbel_soft_tokens,
                                         validate_settings)


class ParallelSampler(ScaleSampler):
    """Draws all ``pn**2`` tokens of a scale in parallel (VAR, and STAR's small scales).

    Args:
        cfg: classifier-free guidance strength (0 turns guidance off and skips the
            unconditional pass).
        cfg_schedule: "linear" (t = cfg * k / (K - 1), VAR/STAR) or "constant" (t = cfg).
        top_k: keep the k most likely tokens (None: all).
        top_p: nucleus sampling threshold in (0, 1] (None or 1: off).
        temperature: logits are divided by it before sampling.
        gumbel_smoothing: VAR's ``more_smooth``: soft Gumbel-softmax tokens instead of hard
            draws (for visualisation; not used for benchmarks).
    """

    def __init__(self, cfg: float = 4.0, cfg_schedule: str = "linear", top_k: Optional[int] = 600,
                 top_p: Optional[float] = 0.8, temperature: float = 1.0, gumbel_smoothing: bool = False) -> None:
        super().__init__()
        self.cfg, self.cfg_schedule = cfg, cfg_schedule
        self.top_k, self.top_p, self.temperature = top_k, top_p, temperature
        self.gumbel_smoothing = gumbel_smoothing
        self.validate()
        # explicit names: a sampler built inside another module's __init__ must not pick up its arguments
        self.save_hyperparameters("cfg", "cfg_schedule", "top_k", "top_p", "temperature", "gumbel_smoothing")

    def validate(self) -> None:
        validate_settings(self.cfg, self.top_k, self.top_p, self.temperature, self.cfg_schedule)

    def guided_logits(self, step: ScaleStep) -> torch.Tensor:
        """The logits after guidance at this scale, ``(B, l, V)``."""
        t = guidance_weight(self.cfg, step.scale, step.num_scales, self.cfg_schedule)
        return apply_guidance(step.logits, t, step.guided)

    def sample_scale(self, step: ScaleStep):
        logits = self.guided_logits(step)
        if self.gumbel_smoothing:
            ratio = step.scale / max(step.num_scales - 1, 1)
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            soft = gumbel_soft_tokens(logits * (1 + ratio), step.codebook, tau, step.generator)
            return soft, logits.argmax(dim=-1)
        idx, _ = draw(candidates(logits, self.top_k, self.top_p, self.temperature), step.generator)
        return step.embed(idx), idx  # (B, l, Cvae), (B, l)
