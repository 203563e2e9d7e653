"""Training losses of the tokenizer: perceptual hook, patch discriminator, hinge loss and
the VQGAN adaptive weight.

The perceptual loss takes any feature network (``images in [-1, 1] -> list of feature
maps``); LPIPS-style, each feature map is unit-normalised over channels and the squared
differences are averaged. Plug a VGG / LPIPS trunk in through YAML (``class_path``) when
its weights are available.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on the feature maps of a frozen network.

    Its weights are not part of the tokenizer's ``state_dict`` (they come from the
    feature network's own source), so VAR's checkpoints still load strictly.

    Args:
        feature_net: module mapping images ``(B, 3, H, W)`` in [-1, 1] to a list of
            feature maps ``(B, C_l, H_l, W_l)``; frozen and kept in eval mode.
    """

    def __init__(self, feature_net: nn.Module) -> None:
        super().__init__()
        self.net = feature_net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.net.eval()
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Nothing to save: the feature network is loaded from its own source."""
        if destination is None and args:
            destination = args[0]
        return destination if destination is not None else {}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # 2 x (B, 3, H, W)
        fx: List[torch.Tensor] = self.net(x)
        fy: List[torch.Tensor] = self.net(y)
        loss = x.new_zeros((), dtype=torch.float32)
        for a, b in zip(fx, fy):
            a = a.float() / (a.float().norm(dim=1, keepdim=True) + 1e-10)  # (B, C_l, H_l, W_l)
            b = b.float() / (b.float().norm(dim=1, keepdim=True) + 1e-10)
            loss = loss + (a - b).square().sum(1).mean()
        return loss / max(len(fx), 1)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator``) with GroupNorm.

    Args:
        in_channels: image channels.
        channels: width of the first layer; doubles per layer up to ``8 * channels``.
        num_layers: number of stride-2 layers (the receptive field grows with it).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = channels
        for i in range(1, num_layers + 1):
            c_out = channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False),
                       nn.GroupNorm(math.gcd(32, c_out), c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1, h, w) logits
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (relu(1 - D(x)) + relu(1 + D(G(z))))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN loss: ``-D(G(z))``."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: ``|grad rec_loss| / |grad g_loss|`` on the decoder's last layer.

    Returns a detached scalar in ``[0, max_weight]``; 0 when the graph does not reach
    ``last_layer`` (e.g. a frozen decoder).
    """
    if not (rec_loss.requires_grad and g_loss.requires_grad and last_layer.requires_grad):
        return rec_loss.new_zeros(())
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


def optional_perceptual(feature_net: Optional[nn.Module]) -> Optional[PerceptualLoss]:
    """Wrap a feature network in :class:`PerceptualLoss` (None stays None)."""
    return None if feature_net is None else PerceptualLoss(feature_net)
