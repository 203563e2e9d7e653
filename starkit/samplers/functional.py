"""Sampling primitives shared by the samplers: guidance, filtering, draws without host sync."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch


class RowGenerators:
    """One random stream per image: row ``b`` of every draw comes from ``torch.Generator`` seeded with
    ``seeds[b]``, so an image depends on its own seed only, not on the other images of its batch, the
    batch size or the order (what ``starkit predict`` promises for per-prompt seeds). Costs one small
    kernel per row and draw instead of one per draw.

    Args:
        seeds: one integer per image row.
        device: where the draws are made.
    """

    def __init__(self, seeds: Sequence[int], device) -> None:
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def fill_rows(self, out: torch.Tensor, fill) -> torch.Tensor:
        """``fill(row_view, generator)`` on each row of ``out`` ``(B, ...)`` in place; returns ``out``."""
        if out.shape[0] != len(self.generators):
            raise ValueError(f"{out.shape[0]} rows to draw for {len(self.generators)} per-image seeds.")
        for row, generator in zip(out, self.generators):
            fill(row, generator)
        return out


RandomSource = Union[None, torch.Generator, RowGenerators]


def exponential_noise(like: torch.Tensor, generator: RandomSource = None) -> torch.Tensor:
    """Exp(1) noise shaped like ``like`` ``(B, ...)``, from one generator or one per row."""
    out = torch.empty_like(like)
    if isinstance(generator, RowGenerators):
        return generator.fill_rows(out, lambda row, g: row.exponential_(1.0, generator=g))
    return out.exponential_(1.0, generator=generator)


def uniform_noise(like: torch.Tensor, low: float = 0.0, high: float = 1.0,
                  generator: RandomSource = None) -> torch.Tensor:
    """U(low, high) noise shaped like ``like`` ``(B, ...)``, from one generator or one per row."""
    out = torch.empty_like(like)
    if isinstance(generator, RowGenerators):
        return generator.fill_rows(out, lambda row, g: row.uniform_(low, high, generator=g))
    return out.uniform_(low, high, generator=generator)


def guidance_weight(cfg: float, scale: int, num_scales: int, schedule: str = "linear") -> float:
    """CFG strength t at scale k: ``cfg * k / (K - 1)`` (linear ramp, VAR/STAR) or ``cfg``."""
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        return float(cfg) * scale / max(num_scales - 1, 1)
    raise ValueError(f"Unknown guidance schedule {schedule!r}: use 'linear' or 'constant'.")


def apply_guidance(logits: torch.Tensor, t: float, guided: bool) -> torch.Tensor:
    """``(1 + t) * cond - t * uncond`` when the batch holds both halves, else the logits."""
    if not guided:
        return logits
    B = logits.shape[0] // 2
    cond, uncond = logits[:B], logits[B:]
    return cond if t == 0 else (1 + t) * cond - t * uncond


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  temperature: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of ``(..., V)`` logits.

    Semantics follow VAR's ``sample_with_top_k_top_p_``: top-k keeps the k largest; top-p
    removes the smallest tokens whose cumulative probability is <= 1 - top_p, always
    keeping the most likely one.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    if top_k is not None and 0 < top_k < V:
        return _filter_top_k_then_p(logits, top_k, top_p)
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _filter_top_k_then_p(logits: torch.Tensor, top_k: int, top_p: Optional[float]) -> torch.Tensor:
    """Top-k then top-p from one sorted top-k: the nucleus is found among the k kept tokens (every
    other token has probability 0 after top-k), not by sorting the whole vocabulary. The same
    tokens as the two-pass definition, except that exactly k tokens survive a tie at the k-th value."""
    values, indices = logits.topk(top_k, dim=-1, sorted=True)  # (..., k) descending
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, _nucleus(values, top_p))


def _nucleus(values: torch.Tensor, top_p: Optional[float]) -> torch.Tensor:
    """Top-p among logits sorted in descending order ``(..., k)``: -inf on the tail that top-p removes."""
    if top_p is None or not 0 < top_p < 1:
        return values
    probs = values.softmax(dim=-1)
    # probability of this token and all less likely ones = the ascending cumulative sum
    tail = probs.flip(-1).cumsum(dim=-1).flip(-1)
    remove = tail <= (1 - top_p)
    remove[..., 0] = False  # always keep the most likely token
    return values.masked_fill(remove, float("-inf"))


class Candidates(NamedTuple):
    """The tokens a draw may pick after filtering: ``probs`` ``(..., n)`` (zeros where filtered out)
    and their vocabulary ids ``indices`` ``(..., n)``, or None when ``n`` is the whole vocabulary."""

    probs: torch.Tensor
    indices: Optional[torch.Tensor]


def candidates(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
               temperature: float = 1.0) -> Candidates:
    """Temperature, top-k and top-p as :func:`filter_logits`, but kept among the ``k`` most likely tokens:
    with top-k the filtered distribution is never scattered back to ``(..., V)``, so every later pass
    (softmax, draw, the drawn token's probability) reads ``k`` columns instead of ``V`` (600 of 4096
    at STAR's settings). Without top-k the candidates are the whole vocabulary."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        values, indices = logits.topk(top_k, dim=-1, sorted=True)  # (..., k) descending
        return Candidates(_nucleus(values, top_p).softmax(dim=-1), indices)
    return Candidates(filter_logits(logits, None, top_p).softmax(dim=-1), None)


def draw(cands: Candidates, generator: RandomSource = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One draw per row among the candidates -> vocabulary ids ``(...)`` and the probability of each
    drawn token under the filtered distribution ``(...)`` (STAR's confidence score).

    Exponential race (argmax of p / E, E ~ Exp(1)): exactly the categorical distribution, no host sync."""
    noise = exponential_noise(cands.probs, generator)
    choice = (cands.probs / noise).argmax(dim=-1, keepdim=True)  # (..., 1) position among the candidates
    prob = cands.probs.gather(-1, choice)[..., 0]
    ids = choice if cands.indices is None else cands.indices.gather(-1, choice)
    return ids[..., 0], prob


def sample_categorical(logits: torch.Tensor, generator: RandomSource = None) -> torch.Tensor:
    """One draw per row from softmax(logits) ``(..., V)`` -> indices ``(...)``: :func:`draw` over the whole
    vocabulary (the exponential race: exactly categorical, no host synchronisation, unlike torch.multinomial)."""
    return draw(Candidates(logits.float().softmax(dim=-1), None), generator)[0]


def gumbel_soft_tokens(logits: torch.Tensor, codebook: torch.Tensor, tau: float,
                       generator: RandomSource = None) -> torch.Tensor:
    """Gumbel-softmax mixture of codebook rows ``(B, l, Cvae)`` (VAR's ``more_smooth``)."""
    logits = logits.float()
    gumbels = -torch.log(-torch.log(uniform_noise(logits, 1e-10, 1.0, generator)))
    weights = ((logits + gumbels) / tau).softmax(dim=-1)  # (B, l, V)
    return weights @ codebook.float()


def validate_settings(cfg=None, top_k=None, top_p=None, temperature=None, schedule=None) -> None:
    """One clear error for invalid sampling settings (NaN included: every comparison with it is False)."""
    if cfg is not None and not (0 <= cfg < math.inf):
        raise ValueError(f"cfg must be >= 0 and finite (0 turns guidance off), got {cfg}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be >= 1, an int (or None to disable top-k), got {top_k!r}.")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 or None disables it), got {top_p}.")
    if temperature is not None and not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}.")
    if schedule is not None and schedule not in ("linear", "constant"):
        raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {schedule!r}.")
