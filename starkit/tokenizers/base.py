"""The tokenizer interface: images <-> K maps of discrete tokens, one per scale.

A ``ScaleTokenizer`` is a LightningModule so that it can be trained on its own (stage 1)
and later plugged, frozen, into the generator. Inside the generator it is used only
through the plain methods below, never through its own Lightning hooks or ``self.log``.

Conventions (VAR's):

- ``patch_nums``: side of each scale's token map, small to large; ``pn_K`` is the side of
  the latent grid, so the image side is ``pn_K * downsample``.
- Token maps are flattened row-major: scale k holds ``pn_k**2`` tokens.
- ``f_hat`` is the running reconstruction of the latent, ``(B, embed_dim, pn_K, pn_K)``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import lightning as L
import torch


class ScaleTokenizer(L.LightningModule):
    """Base class of multi-scale tokenizers (the interface the generator relies on).

    Subclasses set ``patch_nums``, ``codebook_size``, ``embed_dim`` and ``downsample`` and
    implement :meth:`encode`, :meth:`embed`, :meth:`add_scale` and :meth:`decode_latent`.
    Everything else (teacher forcing, incremental inputs, decode from indices) is derived
    here, so that the teacher-forcing inputs and the incremental inputs agree exactly.
    """

    patch_nums: Tuple[int, ...]
    codebook_size: int
    embed_dim: int
    downsample: int

    # ---------------------------------------------------------------- required
    def encode(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> K LongTensors ``(B, pn_k**2)``."""
        raise NotImplementedError

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook lookup: LongTensor ``(B, l)`` -> embeddings ``(B, l, embed_dim)``."""
        raise NotImplementedError

    @property
    def codebook(self) -> torch.Tensor:
        """The codebook ``(codebook_size, embed_dim)`` (for soft, Gumbel-smoothed tokens)."""
        raise NotImplementedError

    def add_scale(self, f_hat: torch.Tensor, scale: int, h_BlC: torch.Tensor) -> torch.Tensor:
        """Add the embeddings ``(B, pn_k**2, embed_dim)`` of scale ``scale`` to ``f_hat``
        (upsample to the latent grid, then the scale's refinement); returns the new ``f_hat``."""
        raise NotImplementedError

    def decode_latent(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, embed_dim, pn_K, pn_K)`` -> images ``(B, 3, H, W)`` in [-1, 1]."""
        raise NotImplementedError

    # ---------------------------------------------------------------- derived
    @property
    def num_scales(self) -> int:
        """K, the number of scales."""
        return len(self.patch_nums)

    @property
    def resolution(self) -> int:
        """Side of the images this tokenizer encodes and decodes with its ``patch_nums``."""
        return self.patch_nums[-1] * self.downsample

    def set_patch_nums(self, patch_nums: Sequence[int]) -> None:
        """Use another set of scales (e.g. the same weights at 256, 512 or 1024)."""
        self.patch_nums = tuple(int(p) for p in patch_nums)

    def empty_latent(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """A zero ``f_hat`` ``(B, embed_dim, pn_K, pn_K)`` to start sampling from."""
        pn = self.patch_nums[-1]
        return torch.zeros(batch_size, self.embed_dim, pn, pn, device=device, dtype=dtype)

    def next_scale_input(self, f_hat: torch.Tensor, scale: int) -> torch.Tensor:
        """The generator's input for scale ``scale`` (>= 1): ``f_hat`` area-downsampled to
        ``pn_scale`` and flattened row-major to ``(B, pn_scale**2, embed_dim)``."""
        pn = self.patch_nums[scale]
        x = f_hat if pn == f_hat.shape[-1] else torch.nn.functional.interpolate(f_hat, size=(pn, pn), mode="area")
        return x.flatten(2).transpose(1, 2)  # (B, pn*pn, C)

    def teacher_forcing_inputs(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inputs of scales 1..K-1 for teacher forcing, ``(B, L - pn_0**2, embed_dim)``.

        Built with exactly the same calls as incremental sampling (:meth:`add_scale` then
        :meth:`next_scale_input`), so both agree bit for bit.
        """
        B = indices[0].shape[0]
        f_hat = self.empty_latent(B, device=indices[0].device)
        inputs = []
        for k in range(self.num_scales - 1):
            f_hat = self.add_scale(f_hat, k, self.embed(indices[k]).float())
            inputs.append(self.next_scale_input(f_hat, k + 1))
        return torch.cat(inputs, dim=1)  # (B, L - pn_0^2, C)

    def decode(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """K LongTensors ``(B, pn_k**2)`` -> images ``(B, 3, H, W)`` in [-1, 1]."""
        f_hat = self.indices_to_latent(indices)
        return self.decode_latent(f_hat)

    def indices_to_latent(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """K LongTensors -> the final ``f_hat`` ``(B, embed_dim, pn_K, pn_K)``."""
        if len(indices) != self.num_scales:
            raise ValueError(
                f"decode got {len(indices)} token maps but the tokenizer has {self.num_scales} scales "
                f"(patch_nums={self.patch_nums}); pass one LongTensor per scale."
            )
        for k, (idx, pn) in enumerate(zip(indices, self.patch_nums)):
            if idx.dim() != 2 or idx.shape[1] != pn * pn:
                raise ValueError(f"token map {k} has shape {tuple(idx.shape)}; scale {k} of patch_nums "
                                 f"{self.patch_nums} needs (B, {pn * pn}).")
            if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
                raise ValueError(f"token map {k} is {idx.dtype}; token ids are integers (LongTensor), as encode() "
                                 f"and the generator return them.")
        self._check_id_range(indices)
        f_hat = self.empty_latent(indices[0].shape[0], device=indices[0].device)
        for k, idx in enumerate(indices):
            f_hat = self.add_scale(f_hat, k, self.embed(idx).float())
        return f_hat

    def _check_id_range(self, indices: Sequence[torch.Tensor]) -> None:
        """One clear error for ids outside the codebook (an embedding lookup would raise a bare IndexError, or a
        device-side assert on CUDA). One host synchronisation for all scales; decoding only, not sampling."""
        V = self.codebook.shape[0]
        present = [idx for idx in indices if idx.numel()]
        if not present:
            return
        bounds = torch.stack([torch.stack((idx.min(), idx.max())) for idx in present]).tolist()
        lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids run from {lo} to {hi} but this tokenizer's codebook has {V} entries "
                             f"(ids 0..{V - 1}): the tokens come from another tokenizer or codebook size; decode them "
                             f"with the tokenizer that made them.")

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """encode then decode (for quick checks of a tokenizer)."""
        return self.decode(self.encode(images))

    def check_patch_nums(self, patch_nums: Sequence[int], resolution: Optional[int] = None) -> None:
        """Raise a clear error when ``patch_nums`` cannot work with this tokenizer."""
        patch_nums = tuple(patch_nums)
        if list(patch_nums) != sorted(set(patch_nums)) or patch_nums[0] < 1:
            raise ValueError(f"patch_nums must be strictly increasing positive ints, got {patch_nums}.")
        if resolution is not None and patch_nums[-1] * self.downsample != resolution:
            raise ValueError(
                f"patch_nums {patch_nums} end at {patch_nums[-1]}, which with the tokenizer's downsampling "
                f"x{self.downsample} gives {patch_nums[-1] * self.downsample} px, not the data's {resolution} px. "
                f"Set the last patch_num to {resolution // self.downsample} or the resolution to "
                f"{patch_nums[-1] * self.downsample}."
            )
