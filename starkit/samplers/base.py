"""The sampler interface: turns the logits (and hidden states) of one scale into tokens."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import lightning as L
import torch


@dataclass
class ScaleStep:
    """Everything a sampler may use at scale k of one generation.

    With guidance the conditional rows come first: ``hidden`` and the logits are
    ``(2B, l, ...)`` and rows ``B:`` are the unconditional (empty prompt) pass.

    Attributes:
        scale: k, 0-based.
        num_scales: K.
        patch_num: pn_k (the scale's side; l = pn_k**2 tokens).
        hidden: the generator's last hidden states of this scale ``(B or 2B, l, C)``.
        logits: the generator's logits of this scale ``(B or 2B, l, V)`` (float32).
        guided: True when rows B: are the unconditional pass.
        embed: codebook lookup ``LongTensor (B, l) -> (B, l, Cvae)`` (the tokenizer's).
        codebook: ``(V, Cvae)`` codebook (for soft tokens).
        pooled_text: pooled text features ``(B or 2B, D)`` used by samplers with a head.
        rotary: the positional encoding's rotary tables for this scale, or None.
        rotary_first: the rotary tables of the first token (the start position), or None.
        generator: torch.Generator for reproducible sampling, or None.
        compile_blocks: the call asked for compiled block regions (``generate(compile_blocks=True)``):
            a sampler with transformer blocks of its own may run them the same way.
        graph_store: with ``generate(cuda_graphs=True)``, a dict kept by the generator between calls (freed by
            ``release_cuda_graphs()``) where a sampler may keep CUDA graphs of its own steps; else None.
        max_patch_num: the side of the generation's last (largest) scale, or None: a sampler's compiled code
            may run once at that size before its first real call (:func:`starkit.utils.compiling.tune_first_at`).
    """

    scale: int
    num_scales: int
    patch_num: int
    hidden: torch.Tensor
    logits: torch.Tensor
    guided: bool
    embed: Callable[[torch.Tensor], torch.Tensor]
    codebook: torch.Tensor
    pooled_text: Optional[torch.Tensor] = None
    rotary: Optional[tuple] = None
    rotary_first: Optional[tuple] = None
    generator: Optional[torch.Generator] = None
    compile_blocks: bool = False
    graph_store: Optional[dict] = None
    max_patch_num: Optional[int] = None


@dataclass
class HeadTrainingBatch:
    """What a sampler with weights gets in its own training stage (generator frozen).

    Attributes:
        hidden: the frozen generator's last hidden states of all scales ``(B, L, C)``.
        indices: ground-truth token maps, K LongTensors ``(B, pn_k**2)``.
        pooled_text: pooled text features ``(B, D)`` (captions already dropped to "" at the
            caption-dropout rate).
        patch_nums: the scales.
        embed: codebook lookup ``LongTensor (B, l) -> (B, l, Cvae)``.
        rotary: the generator's ``positional.rotary(positions)`` (tables or None).
    """

    hidden: torch.Tensor
    indices: list
    pooled_text: torch.Tensor
    patch_nums: tuple
    embed: Callable[[torch.Tensor], torch.Tensor]
    rotary: Callable


class ScaleSampler(L.LightningModule):
    """Base class of samplers. A sampler may own weights (a head) and a training loss; it is
    used by the generator through plain methods only (see ENGINEERING notes on nesting).

    Subclasses implement :meth:`sample_scale`, which returns the token embeddings
    ``(B, l, Cvae)`` of the scale (hard tokens: codebook rows; soft tokens allowed) and the
    indices ``(B, l)`` (the argmax for soft tokens).
    """

    has_weights: bool = False

    def sample_scale(self, step: ScaleStep) -> tuple:
        raise NotImplementedError

    def with_settings(self, **overrides) -> "ScaleSampler":
        """A shallow copy (sharing weights) with some settings changed; None values are ignored."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if not overrides:
            return self
        other = copy.copy(self)
        other.__dict__ = dict(self.__dict__)
        for k, v in overrides.items():
            if not hasattr(self, k):
                raise ValueError(f"{type(self).__name__} has no setting {k!r}.")
            setattr(other, k, v)
        other.validate()
        return other

    def validate(self) -> None:
        """Raise a clear error on invalid settings (called at construction and on overrides)."""

    def training_loss(self, batch: HeadTrainingBatch):
        """Loss of the sampler's own weights (the sampler-head stage): ``(loss, {name: value})``."""
        raise NotImplementedError(f"{type(self).__name__} has no weights to train; use a sampler with a head "
                                  f"(e.g. StableSampler) for stage='sampler_head'.")

    def build(self, width: int, text_dim: int, latent_dim: int, vocab_size: int, num_heads: int,
              patch_nums: tuple) -> None:
        """Called once by the generator with the sizes only it knows, so samplers with weights
        can create them (samplers without weights do nothing)."""
