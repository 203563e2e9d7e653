"""The convolutional encoder and decoder of the multi-scale VQ tokenizer.

The layout follows the taming / latent-diffusion "f16" autoencoder that VAR uses, so that
parameter names and shapes match VAR's released ``vae_ch160v4096z32.pth`` exactly:
``conv_in``, ``down.{i}.block.{j}`` / ``up.{i}.block.{j}`` (ResNet blocks),
``down.{i}.attn.{j}`` / ``up.{i}.attn.{j}`` (self-attention, lowest resolution only),
``down.{i}.downsample.conv`` / ``up.{i}.upsample.conv``, ``mid.block_1``, ``mid.attn_1``,
``mid.block_2``, ``norm_out``, ``conv_out``.

Every block is written to run under bf16 autocast with channels_last tensors: the
single-head attention uses :func:`torch.nn.functional.scaled_dot_product_attention` and
reshapes through ``flatten`` / ``transpose`` views instead of ``view`` calls that assume a
contiguous NCHW layout.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from starkit.utils.inference_cache import autocast_dtype

#: device types on which the inference rewrites below replace the plain layers (no gradients only)
REWRITE_DEVICES = ("cuda",)

#: the inference rewrites, each exact in real arithmetic and on by default; switched off one at a time for A/B
#: measurements (``benchmarks/bench_decoder.py``) and debugging. ``tap_conv_out``: the decoder's last conv as
#: :func:`tap_conv3x3`; ``subpixel_upsample``: nearest 2x upsampling and its 3x3 conv as :func:`upsample_conv3x3`;
#: ``channel_stats_group_norm``: GroupNorm of channels_last maps as :func:`group_norm_channels_last`.
INFERENCE_REWRITES = {"tap_conv_out": True, "subpixel_upsample": True, "channel_stats_group_norm": True}


def use_rewrite(name: str, x: torch.Tensor) -> bool:
    """Whether the inference rewrite ``name`` (:data:`INFERENCE_REWRITES`) applies to input ``x``: switched on,
    no gradients being recorded, and ``x`` on one of :data:`REWRITE_DEVICES`."""
    return INFERENCE_REWRITES[name] and not torch.is_grad_enabled() and x.device.type in REWRITE_DEVICES


def tap_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution (stride 1, padding 1) with few output channels as one matrix product and a shifted sum.

    ``x`` ``(B, Cin, H, W)`` (channels_last: its NHWC view is free) times the filters laid out as
    ``(Cin, 9 * Cout)`` gives every tap's contribution ``(B, H, W, 3, 3, Cout)``; the output at ``(y, x)`` is the
    sum of tap ``(i, j)`` taken at ``(y + i - 1, x + j - 1)`` (zero outside). For ``Cout = 3`` the product is
    memory-bound and far faster than cuDNN's kernel for that shape. Returns ``(B, Cout, H, W)``."""
    B, _, H, W = x.shape
    cout = weight.shape[0]
    dtype = autocast_dtype(x) or x.dtype
    taps = weight.permute(1, 2, 3, 0).reshape(weight.shape[1], 9 * cout).to(dtype)  # (Cin, 9 Cout)
    per_tap = torch.matmul(x.permute(0, 2, 3, 1).to(dtype), taps).view(B, H, W, 3, 3, cout)
    per_tap = F.pad(per_tap.float(), (0, 0, 0, 0, 0, 0, 1, 1, 1, 1))  # (B, H + 2, W + 2, 3, 3, Cout), zero border
    out = sum(per_tap[:, i:i + H, j:j + W, i, j] for i in range(3) for j in range(3))  # (B, H, W, Cout) float32
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype).permute(0, 3, 1, 2)  # (B, Cout, H, W), channels_last strides


#: the 3x3 taps of a nearest-2x-upsampled map that each output phase's 2x2 window of the small map sums:
#: phase 0 (even rows) reads rows (i - 1, i) with taps (0, 1 + 2); phase 1 (odd rows) rows (i, i + 1) with (0 + 1, 2)
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` (stride 1, padding 1) without forming the upsampled map.

    Each of the four output phases ``(a, b)`` (row and column parity) is a 2x2 convolution of ``x`` whose taps are
    sums of the 3x3 taps (:data:`_PHASE_TAPS`, summed in float32): one convolution ``x`` ``(B, Cin, H, W)`` ->
    ``(B, 4 Cout, H + 1, W + 1)`` with padding 1, 16 instead of 36 multiply-adds per input pixel and channel pair,
    then output ``(2i + a, 2j + b)`` = phase ``(a, b)`` at window ``(i + a, j + b)``. Returns ``(B, Cout, 2H, 2W)``
    in ``x``'s memory format (channels_last stays channels_last)."""
    B, _, H, W = x.shape
    cout = weight.shape[0]
    taps = torch.tensor(_PHASE_TAPS, dtype=torch.float32, device=weight.device)  # (2 phases, 2 window, 3 taps)
    phase_w = torch.einsum("auy,bvx,ocyx->abocuv", taps, taps, weight.float())  # (2, 2, Cout, Cin, 2, 2)
    phase_b = None if bias is None else bias.repeat(4)
    y = F.conv2d(x, phase_w.reshape(4 * cout, *phase_w.shape[3:]).to(weight.dtype), phase_b, padding=1)
    y = y.permute(0, 2, 3, 1)  # (B, H + 1, W + 1, 4 Cout), a view for channels_last
    rows = [torch.stack([y[:, a:a + H, b:b + W, (2 * a + b) * cout:(2 * a + b + 1) * cout] for b in range(2)], dim=3)
            for a in range(2)]  # each (B, H, W, 2, Cout)
    out = torch.stack(rows, dim=2).reshape(B, 2 * H, 2 * W, cout).permute(0, 3, 1, 2)  # (B, Cout, 2H, 2W), NHWC
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def group_norm_channels_last(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """``F.group_norm`` in float32 from per-channel statistics, for channels_last maps ``(B, C, H, W)``.

    A group's channels are not contiguous in channels_last memory (5 of every 160 values for VAR's decoder), so a
    reduction over a group reads memory in scattered pieces; here each channel's mean and variance come from a
    reduction over ``H W`` in which neighbouring channels are read together, and a group's statistics follow
    exactly from its channels' (equal counts: the mean of the means; the mean of the variances plus the variance
    of the means). Returns float32, as ``nn.GroupNorm`` does under autocast."""
    B, C = x.shape[:2]
    var_c, mean_c = torch.var_mean(x.float(), dim=(2, 3), correction=0)  # (B, C) each
    mean_g = mean_c.view(B, num_groups, -1).mean(-1)  # (B, G)
    var_g = var_c.view(B, num_groups, -1).mean(-1) + mean_c.view(B, num_groups, -1).var(-1, correction=0)
    rstd_c = (var_g + eps).rsqrt().repeat_interleave(C // num_groups, dim=1)  # (B, C)
    scale_c = rstd_c * weight.float() if weight is not None else rstd_c
    shift_c = -mean_g.repeat_interleave(C // num_groups, dim=1) * scale_c
    if bias is not None:
        shift_c = shift_c + bias.float()
    return x.float() * scale_c[:, :, None, None] + shift_c[:, :, None, None]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) that, at inference on channels_last maps, runs as
    :func:`group_norm_channels_last` (rewrite ``channel_stats_group_norm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
                and use_rewrite("channel_stats_group_norm", x)):
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6), the normalisation used everywhere in the autoencoder."""
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation ResNet block: (GN, SiLU, conv3x3) x 2 plus a (1x1 conv) shortcut.

    Args:
        in_channels: input channels.
        out_channels: output channels; a 1x1 ``nin_shortcut`` conv is added when they differ.
        dropout: dropout probability between the two convolutions (0 disables it).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 ``qkv`` conv and a residual.

    Args:
        channels: channels of the feature map (also the attention head dimension).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # 3 x (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C)
        h = h.squeeze(1).transpose(1, 2).unflatten(2, (H, W))  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one pixel (halves H and W).

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (doubles H and W).

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        conv = self.conv
        if use_rewrite("subpixel_upsample", x) and conv.padding_mode == "zeros":
            return upsample_conv3x3(x, conv.weight, conv.bias)
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _maybe_attn(channels: int, on: bool) -> nn.Module:
    return AttnBlock(channels) if on else nn.Identity()


class Encoder(nn.Module):
    """Images -> latent features, downsampling by ``2 ** (len(ch_mult) - 1)``.

    Args:
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: width multiplier of each resolution level (one level per entry).
        num_res_blocks: ResNet blocks per level.
        z_channels: channels of the output latent.
        in_channels: image channels.
        dropout: dropout inside the ResNet blocks.
        using_sa: self-attention after each block of the lowest-resolution level.
        using_mid_sa: self-attention in the middle block.
    """

    def __init__(self, ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 32, in_channels: int = 3, dropout: float = 0.0,
                 using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c_in, ch * mult, dropout))
                c_in = ch * mult
                if i == n - 1 and using_sa:
                    level.attn.append(AttnBlock(c_in))
            if i != n - 1:
                level.downsample = Downsample(c_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(c_in, c_in, dropout)
        self.mid.attn_1 = _maybe_attn(c_in, using_mid_sa)
        self.mid.block_2 = ResnetBlock(c_in, c_in, dropout)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, z, H/d, W/d)
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> images, upsampling by ``2 ** (len(ch_mult) - 1)``.

    ``up`` is stored from the highest resolution (index 0) to the lowest, as in VAR; the
    forward pass walks it in reverse. Each level has ``num_res_blocks + 1`` ResNet blocks.

    Args:
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: width multiplier of each resolution level.
        num_res_blocks: the encoder's blocks per level (the decoder uses one more).
        z_channels: channels of the input latent.
        out_channels: image channels.
        dropout: dropout inside the ResNet blocks.
        using_sa: self-attention after each block of the lowest-resolution level.
        using_mid_sa: self-attention in the middle block.
    """

    def __init__(self, ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 32, out_channels: int = 3, dropout: float = 0.0,
                 using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        n = len(ch_mult)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(c_in, c_in, dropout)
        self.mid.attn_1 = _maybe_attn(c_in, using_mid_sa)
        self.mid.block_2 = ResnetBlock(c_in, c_in, dropout)
        levels = []
        for i in reversed(range(n)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, ch * ch_mult[i], dropout))
                c_in = ch * ch_mult[i]
                if i == n - 1 and using_sa:
                    level.attn.append(AttnBlock(c_in))
            if i != 0:
                level.upsample = Upsample(c_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, z, h, w) -> (B, 3, h*d, w*d)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.output_conv(F.silu(self.norm_out(h)))

    def output_conv(self, h: torch.Tensor) -> torch.Tensor:
        """``conv_out`` ``(B, c, H, W)`` -> ``(B, 3, H, W)``. At inference on CUDA it runs as one matrix product
        to the 9 taps' outputs and a sum of their shifted maps (:func:`tap_conv3x3`): for 3 output channels cuDNN
        runs a generic kernel at ~1.4 TFLOP/s (6.3 ms per 1024 px image on an H200, docs/performance.md).
        Training (gradients on) runs the plain conv."""
        conv = self.conv_out
        if (not use_rewrite("tap_conv_out", h) or conv.kernel_size != (3, 3)
                or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
                or conv.padding_mode != "zeros"):
            return conv(h)
        return tap_conv3x3(h, conv.weight, conv.bias)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv (the layer the VQGAN adaptive GAN weight is computed on)."""
        return self.conv_out.weight
