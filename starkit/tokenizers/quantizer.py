"""Residual multi-scale vector quantizer with the scale refinements phi (VAR's scheme).

For scales k = 1..K with sides ``pn_k`` (``pn_K`` = latent side)::

    rest = f; f_hat = 0
    for k:  z = area_downsample(rest, pn_k)          (no resize at the last scale)
            idx_k = argmin_v |z - e_v|^2              (plain L2, fp32)
            h = phi_k(bicubic_upsample(e[idx_k], pn_K))
            f_hat += h; rest -= h

``phi(h) = (1 - r) * h + r * conv3x3(h)`` with ``r = quant_resi`` (0.5). The phis are
shared between scales: with ``n`` phis, scale ``k`` uses the one whose tick is nearest to
``k / (K - 1)``, ticks = ``linspace(1/(3n), 1 - 1/(3n), n)`` for n = 4 and
``linspace(1/(2n), 1 - 1/(2n), n)`` otherwise. The parameter names follow VAR's layouts
(``quant_resi.qresi_ls.{i}`` partially shared, ``quant_resi.qresi`` fully shared,
``quant_resi.{i}`` one per scale) so that VAR's checkpoints load strictly.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from .resize import resize


def phi_ticks(num_phi: int) -> np.ndarray:
    """Positions in [0, 1] of ``num_phi`` shared phis (VAR's rule)."""
    n = num_phi
    if n == 4:
        return np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n)
    return np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)


def phi_index(scale: int, num_scales: int, num_phi: int) -> int:
    """Index of the phi used by scale ``scale`` (0-based) among ``num_phi`` shared phis."""
    if num_phi == 1:
        return 0
    at = scale / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(num_phi) - at)))


class Phi(nn.Conv2d):
    """Scale refinement ``phi(h) = (1 - r) * h + r * conv3x3(h)``.

    Args:
        channels: latent channels.
        resi_ratio: ``r``, the weight of the convolution branch.
    """

    def __init__(self, channels: int, resi_ratio: float = 0.5) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        # the weights in h's dtype: the refinement runs in float32 also when the tokenizer was cast to bf16
        conv = F.conv2d(h, self.weight.to(h.dtype), None if self.bias is None else self.bias.to(h.dtype), padding=1)
        return h.mul(1 - self.resi_ratio) + conv.mul(self.resi_ratio)


class PhiBank(nn.Module):
    """The set of phis and the scale -> phi assignment.

    Args:
        channels: latent channels.
        resi_ratio: phi's convolution weight; ``|r| < 1e-6`` makes every phi the identity.
        share: 0 = one phi per scale (``num_scales`` of them), 1 = one phi for all scales,
            n >= 2 = n phis shared between scales by VAR's tick rule.
        num_scales: number of scales at construction (only used when ``share == 0``).
    """

    def __init__(self, channels: int, resi_ratio: float, share: int, num_scales: int) -> None:
        super().__init__()
        self.share = share
        make = lambda: Phi(channels, resi_ratio) if abs(resi_ratio) > 1e-6 else nn.Identity()  # noqa: E731
        if share == 1:
            self.qresi = make()
            self.num_phi = 1
        elif share == 0:  # stored as direct children "0", "1", ... (VAR's ModuleList layout)
            self.num_phi = num_scales
            for i in range(num_scales):
                self.add_module(str(i), make())
        else:
            self.qresi_ls = nn.ModuleList([make() for _ in range(share)])
            self.num_phi = share

    def get(self, scale: int, num_scales: int) -> nn.Module:
        """The phi of scale ``scale`` out of ``num_scales``."""
        i = phi_index(scale, num_scales, self.num_phi)
        if self.share == 1:
            return self.qresi
        if self.share == 0:
            return self._modules[str(i)]
        return self.qresi_ls[i]


class MultiScaleQuantizer(nn.Module):
    """Residual multi-scale quantizer: codebook, phis and per-scale usage statistics.

    Args:
        codebook_size: number of codes V.
        embed_dim: code dimension (the latent's channels).
        patch_nums: side of each scale's token map, small to large.
        beta: commitment weight of the VQ loss.
        quant_resi: phi's convolution weight ``r``.
        share_quant_resi: number of shared phis (0 = one per scale, 1 = fully shared).
    """

    def __init__(self, codebook_size: int, embed_dim: int, patch_nums: Sequence[int], beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4) -> None:
        super().__init__()
        self.codebook_size, self.embed_dim, self.beta = codebook_size, embed_dim, beta
        self.patch_nums = tuple(patch_nums)
        self.quant_resi = PhiBank(embed_dim, quant_resi, share_quant_resi, len(self.patch_nums))
        # EMA of code hits per scale (S, V); same name and shape as VAR's buffer.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), codebook_size))
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.ema_steps = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint saved with another number of scales: keep our own usage buffer (as VAR).
        key = prefix + "ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.ema_vocab_hit_SV.shape:
            state_dict[key] = self.ema_vocab_hit_SV.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_patch_nums(self, patch_nums: Sequence[int]) -> None:
        """Switch scales; the usage buffer is reset when the number of scales changes."""
        self.patch_nums = tuple(patch_nums)
        if self.ema_vocab_hit_SV.shape[0] != len(self.patch_nums):
            self.ema_vocab_hit_SV = self.ema_vocab_hit_SV.new_zeros(len(self.patch_nums), self.codebook_size)
            self.ema_steps = 0

    # ------------------------------------------------------------------ primitives
    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the L2-nearest code of each row of ``z_NC`` (N, C), computed in fp32."""
        e_VC = self.embedding.weight.detach().float()
        d_NV = z_NC.square().sum(1, keepdim=True) + e_VC.square().sum(1)  # (N, V)
        d_NV = torch.addmm(d_NV, z_NC, e_VC.t(), beta=1, alpha=-2)
        return d_NV.argmin(dim=1)  # (N,)

    def upsample_refine(self, h_BChw: torch.Tensor, scale: int, side: int) -> torch.Tensor:
        """phi_k(bicubic_upsample(h, side)); no resize at the last scale. Runs in fp32."""
        K = len(self.patch_nums)
        if scale != K - 1:
            h_BChw = resize(h_BChw, (side, side), "bicubic")  # (B, C, side, side)
        return self.quant_resi.get(scale, K)(h_BChw)  # (B, C, side, side)

    # ------------------------------------------------------------------ quantization
    def forward(self, f_BChw: torch.Tensor, compute_loss: bool = True
                ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
        """Quantize a latent over all scales.

        Args:
            f_BChw: encoder latent ``(B, C, pn_K, pn_K)``.
            compute_loss: build the VQ loss and the straight-through output (training).

        Returns:
            ``f_hat`` (straight-through when ``compute_loss``), the K index tensors
            ``(B, pn_k**2)``, the VQ loss (0 when not computed) and the K hit counts ``(V,)``
            (empty without ``compute_loss``: only training tracks code usage).
        """
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            f = f_BChw.float()
            B, C, H, W = f.shape
            K = len(self.patch_nums)
            if self.patch_nums[-1] != H or H != W:
                raise ValueError(f"latent of side {H}x{W} does not match patch_nums {self.patch_nums} (last must be "
                                 f"the latent side: image side / downsample); resize the images or set patch_nums")
            f_no_grad = f.detach()
            rest = f_no_grad.clone()
            f_hat = torch.zeros_like(f)
            loss = f.new_zeros(())
            indices, hits = [], []
            for k, pn in enumerate(self.patch_nums):
                z = rest if k == K - 1 else F.interpolate(rest, size=(pn, pn), mode="area")  # (B, C, pn, pn)
                idx_N = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C))  # (B*pn*pn,)
                if compute_loss:  # a scatter, not bincount: bincount waits on the GPU for the max index
                    hits.append(torch.zeros(self.codebook_size, device=f.device).index_add_(
                        0, idx_N, torch.ones_like(idx_N, dtype=torch.float32)))
                e = self.embedding(idx_N.view(B, pn, pn)).float().permute(0, 3, 1, 2)  # (B, C, pn, pn)
                h = self.upsample_refine(e, k, H)  # (B, C, H, W)
                f_hat = f_hat + h
                rest = rest - h.detach()
                indices.append(idx_N.view(B, pn * pn))
                if compute_loss:
                    loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_no_grad)
            if compute_loss:
                loss = loss / K
                f_hat = (f_hat.detach() - f_no_grad) + f  # straight-through
        return f_hat, indices, loss, hits

    # ------------------------------------------------------------------ usage statistics
    @torch.no_grad()
    def update_usage(self, hits: List[torch.Tensor], decay: float = 0.99) -> None:
        """Fold one step's per-scale hit counts into the EMA (summed over ranks under DDP)."""
        hits_SV = torch.stack(hits)  # (S, V)
        if tdist.is_available() and tdist.is_initialized():
            tdist.all_reduce(hits_SV)
        if self.ema_steps == 0:
            self.ema_vocab_hit_SV.copy_(hits_SV)
        else:
            self.ema_vocab_hit_SV.mul_(decay).add_(hits_SV, alpha=1 - decay)
        self.ema_steps += 1

    @torch.no_grad()
    def usage_stats(self, dead_threshold: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-scale perplexity of the EMA code distribution and share of dead codes.

        A code is dead at a scale when its EMA hit frequency is below ``dead_threshold``
        times the uniform frequency ``1 / V``.
        """
        p_SV = self.ema_vocab_hit_SV / self.ema_vocab_hit_SV.sum(1, keepdim=True).clamp_min(1e-12)
        perplexity_S = torch.exp(-(p_SV * p_SV.clamp_min(1e-12).log()).sum(1))
        dead_S = (p_SV < dead_threshold / self.codebook_size).float().mean(1)
        return perplexity_S, dead_S

    @torch.no_grad()
    def reinit_dead_codes(self, candidates_NC: torch.Tensor, dead_threshold: float = 1e-3) -> int:
        """Re-initialise codes unused at every scale from random rows of ``candidates_NC``.

        Returns the number of codes re-initialised (identical on all ranks under DDP).
        """
        p_V = self.ema_vocab_hit_SV.sum(0)
        p_V = p_V / p_V.sum().clamp_min(1e-12)
        dead = (p_V < dead_threshold / self.codebook_size).nonzero().squeeze(1)  # (D,)
        if dead.numel() == 0 or candidates_NC.shape[0] == 0:
            return 0
        pick = torch.randint(0, candidates_NC.shape[0], (dead.numel(),), device=candidates_NC.device)
        new = candidates_NC[pick].to(self.embedding.weight.dtype)  # (D, C)
        if tdist.is_available() and tdist.is_initialized():
            tdist.broadcast(new, src=0)
        self.embedding.weight.data[dead] = new
        # Give them a fresh start so they are not re-initialised again at once.
        self.ema_vocab_hit_SV[:, dead] = self.ema_vocab_hit_SV.sum(1, keepdim=True) / self.codebook_size
        return int(dead.numel())
