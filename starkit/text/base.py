"""The text-encoder interface: prompts -> token features, key-padding mask, pooled vector."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import lightning as L
import torch


@dataclass
class TextEmbedding:
    """What a text encoder returns for B prompts.

    Attributes:
        tokens: token features ``(B, T, D)``.
        mask: key-padding mask ``(B, T)``, True where a token is real (not padding).
        pooled: one vector per prompt ``(B, D)`` (the generator's start token is built from it).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, *args, **kwargs) -> "TextEmbedding":
        """Move/cast the float tensors (the mask stays boolean)."""
        return TextEmbedding(self.tokens.to(*args, **kwargs), self.mask.to(device=self.tokens.to(*args, **kwargs).device),
                             self.pooled.to(*args, **kwargs))

    def __getitem__(self, index) -> "TextEmbedding":
        return TextEmbedding(self.tokens[index], self.mask[index], self.pooled[index])

    def repeat_interleave(self, n: int) -> "TextEmbedding":
        """Each prompt n times in a row (n images per prompt)."""
        return TextEmbedding(self.tokens.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0),
                             self.pooled.repeat_interleave(n, 0))

    @staticmethod
    def cat(parts: Sequence["TextEmbedding"]) -> "TextEmbedding":
        """Concatenate along the batch, padding the token axis to the longest."""
        T = max(p.tokens.shape[1] for p in parts)
        toks, masks = [], []
        for p in parts:
            pad = T - p.tokens.shape[1]
            toks.append(torch.nn.functional.pad(p.tokens, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(p.mask, (0, pad), value=False))
        return TextEmbedding(torch.cat(toks), torch.cat(masks), torch.cat([p.pooled for p in parts]))


class TextEncoder(L.LightningModule):
    """Base class of text encoders: frozen by default, in eval mode, kept out of the
    generator's checkpoint (it is rebuilt from its own config and weights).

    Subclasses set ``dim`` (the width D of token features and pooled vector) and
    implement :meth:`_encode`.

    Args:
        frozen: no gradients and always in eval mode (encoding runs under ``torch.no_grad``).
    """

    dim: int

    def __init__(self, frozen: bool = True) -> None:
        super().__init__()
        self.frozen = frozen
        self._empty_cache = None
        self._cuda_graphs = False  # set by encode() for the duration of one call

    def _encode(self, prompts: List[str]) -> TextEmbedding:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str], cuda_graphs: bool = False) -> TextEmbedding:
        """Encode a non-empty list of prompts; the empty string "" is allowed (the guidance prompt).
        ``cuda_graphs``: an encoder that can (:class:`~starkit.text.HFTextEncoder`) replays its model from a CUDA
        graph per batch shape at inference on a GPU (what ``generate(cuda_graphs=...)`` asks); others ignore it."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if len(prompts) == 0:
            raise ValueError("The prompt list is empty: give at least one prompt (an empty string \"\" is allowed).")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"Prompts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}.")
        previous, self._cuda_graphs = self._cuda_graphs, bool(cuda_graphs)  # (not thread-safe, as generation)
        try:
            if self.frozen:
                with torch.no_grad():
                    return self._encode(prompts)
            return self._encode(prompts)
        finally:
            self._cuda_graphs = previous

    def release_cuda_graphs(self) -> None:
        """Free the CUDA graphs that ``encode(..., cuda_graphs=True)`` keeps (none in this base class)."""

    def empty(self) -> TextEmbedding:
        """The embedding of the empty prompt "" (for classifier-free guidance), computed once."""
        device = next(iter(self.parameters()), torch.empty(0)).device
        if self._empty_cache is None or self._empty_cache.tokens.device != device:
            self._empty_cache = self.encode([""])
        return self._empty_cache

    def freeze_if_needed(self) -> None:
        """Put a frozen encoder in eval mode with no gradients (called by subclasses after loading)."""
        if self.frozen:
            self.eval()
            for p in self.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        # a frozen encoder stays in eval mode even when the generator is put in train mode
        return super().train(False if self.frozen else mode)
