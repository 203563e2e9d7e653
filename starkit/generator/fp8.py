"""FP8 (e4m3) matrix products for generation: ``generate(..., fp8=True)``.

The linear layers of the transformer's blocks and of the stable sampler head's blocks (queries, keys and
values; the attention outputs' projections; the cross-attention queries; both FFN layers) multiply in
float8 e4m3 with one scale per row of the activations and one per output channel of the weights
(``torch._scaled_mm``'s row-wise scaling), accumulate in float32 and write the compute dtype (bf16 on a
GPU). The text keys and values (once per prompt), the logits heads, the embeddings and the VQ decoder stay
in the compute dtype, and so does training: this is an inference mode.

What it costs: each product's output differs from bf16's by ~4% (relative, e4m3 has 3 mantissa bits;
bf16's own rounding is ~0.4%), so images differ from the bf16 ones of the same seed. What it buys: on an
H200 the products run 1.3-1.9x faster than bf16 at d30's shapes (docs/performance.md); the activations'
quantization (a row maximum and a cast) is fused into the compiled regions that form the products' inputs
(``generate(compile_blocks=True)``, ``StableSampler(compile_head=True)``). Without them each quantization is
a pass of its own and the products are slower than bf16's: use fp8 with the compiled paths. End to end on an
H200 (docs/performance.md, eleventh comparison), d30 @1024 stable batch 16 with all compiled paths: 0.3417 ->
0.2889 s/image; batch 1: 0.3727 -> 0.3561 s; d30 @512 and d16 @256 at batch 1 are slower in fp8 (a few hundred
rows per product: the quantization costs more than the products save). The demo model's ShapesScore: 31.9
(float32) against 31.4 (fp8) with the stable sampler, 32.2 against 32.4 with the parallel one, within its seeds'
spread.

A layer multiplies in FP8 when its ``fp8`` attribute is set (:func:`fp8_layers` sets it for the duration of a
call), gradients are off, and both its widths are multiples of 16 (``_scaled_mm``'s constraint). The FP8
copy of a weight and its scales are formed once per weight version (:func:`inference_cached`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from starkit.utils.inference_cache import autocast_dtype, inference_cached

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3 value


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(..., K)`` -> e4m3 ``(M, K)`` and float32 scales ``(M, 1)``, M the product of the leading
    dimensions, with ``x ~= q * scale`` row by row (each row's largest magnitude maps to 448)."""
    rows = x.reshape(-1, x.shape[-1]).float()  # (M, K)
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / E4M3_MAX  # (M, 1)
    return (rows / scale).to(E4M3), scale


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A weight ``(N, K)`` -> e4m3 ``(N, K)`` and the float32 scale of each output channel ``(1, N)``."""
    q, scale = quantize_rows(weight)
    return q, scale.t().contiguous()


def gelu_quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of ``GELU_tanh(x)``: the FFN's second input. On CUDA with Triton one kernel reads
    each row once (:mod:`starkit.generator.fp8_kernels`); Inductor's code for the same reads it twice (the
    row maximum first), at 4C = 7680 columns the larger part of what FP8 costs at d30 (docs/performance.md)."""
    if x.is_cuda:
        from starkit.generator import fp8_kernels
        if fp8_kernels.AVAILABLE:
            return torch.ops.starkit.gelu_quantize_rows(x.reshape(-1, x.shape[-1]))
    return quantize_rows(F.gelu(x, approximate="tanh"))


def product(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            weight_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The FP8 product of row-quantized ``q`` ``(M, K)`` with scales ``(M, 1)`` and an e4m3 ``weight``
    ``(N, K)`` with scales ``(1, N)``, plus ``bias``: ``(M, N)`` in ``out_dtype``."""
    return torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale,
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           weight_scale: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
           gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, or with ``weight_scale`` (an e4m3 ``weight`` ``(N, K)`` from
    :func:`quantize_weight` and its scales ``(1, N)``) the FP8 product of ``x`` ``(..., K)`` quantized row by
    row: ``(..., N)`` in ``out_dtype`` (default: the bias's dtype, else x's). ``gelu``: of ``GELU_tanh(x)``."""
    if weight_scale is None:
        return F.linear(F.gelu(x, approximate="tanh") if gelu else x, weight, bias)
    out_dtype = out_dtype or (bias.dtype if bias is not None else x.dtype)
    q, scale = gelu_quantize_rows(x) if gelu else quantize_rows(x)  # (M, K), (M, 1)
    return product(q, scale, weight, bias, weight_scale, out_dtype).view(*x.shape[:-1], weight.shape[0])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype products write: the autocast dtype of ``x``'s device, else ``x``'s."""
    return autocast_dtype(x) or x.dtype


def eligible(layer: nn.Linear) -> bool:
    """Whether ``layer`` can multiply in FP8: both widths multiples of 16 (``_scaled_mm``)."""
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


def active(layer: nn.Module) -> bool:
    """Whether ``layer`` multiplies in FP8 now: its ``fp8`` flag set and gradients off."""
    return getattr(layer, "fp8", False) and not torch.is_grad_enabled()


def weights(layer: nn.Linear, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """``(weight, bias, weight_scale)`` for :func:`linear`: the e4m3 weight and its scales when ``layer`` is
    :func:`active` (formed once per weight version, or the copies :func:`pack` stored), else the weight in the
    autocast dtype of ``x``'s device and ``weight_scale`` None. ``bias``: another bias than the layer's own
    (the attentions' concatenated ones), already in the compute dtype."""
    from starkit.generator.blocks import autocast_weight
    if bias is None:
        bias = autocast_weight(layer, "bias", layer.bias, x)
    if not active(layer):
        return autocast_weight(layer, "weight", layer.weight, x), bias, None
    packed = getattr(layer, "fp8_weight", None)
    if packed is not None:  # a copy made for compiled code (pack): the graph reads them as they are
        q, scale = packed, layer.fp8_scale
    else:
        q, scale = inference_cached(layer, "fp8", (layer.weight,), lambda: quantize_weight(layer.weight.detach()))
    return q, bias, scale


def layer_linear(layer: nn.Linear, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 gelu: bool = False) -> torch.Tensor:
    """``layer(x)`` (with ``bias`` instead of the layer's own if given; ``gelu``: ``layer(GELU_tanh(x))``)
    through :func:`weights` and :func:`linear`; the compute dtype is the autocast dtype (else x's)."""
    weight, bias, scale = weights(layer, x, bias)
    if scale is None:
        return F.linear(F.gelu(x, approximate="tanh") if gelu else x, weight, bias)
    return linear(x, weight, bias, scale, out_dtype=compute_dtype(x), gelu=gelu)


def pack(layer: nn.Linear) -> None:
    """Store the e4m3 weight and scales of ``layer`` as buffers (``fp8_weight``, ``fp8_scale``) for code
    compiled whole (the sampler head's ``compile_head`` copy), which would otherwise quantize the weight in
    its graph at every call."""
    q, scale = quantize_weight(layer.weight.detach())
    layer.register_buffer("fp8_weight", q, persistent=False)
    layer.register_buffer("fp8_scale", scale, persistent=False)


def block_layers(module: nn.Module) -> Iterator[nn.Linear]:
    """The linear layers that FP8 mode converts: those of the transformer blocks inside ``module``
    (``mat_qkv``, ``proj``, ``mat_q``, ``fc1``, ``fc2``), not the text keys and values (``mat_kv``, once per
    prompt), the logits heads, the embeddings or AdaLN's layers."""
    from starkit.generator.blocks import Block
    for block in module.modules():
        if not isinstance(block, Block):
            continue
        attn, cross, ffn = block.attn, block.cross_attn, block.ffn
        for layer in (attn.mat_qkv, attn.proj, ffn.fc1, ffn.fc2) + ((cross.mat_q, cross.proj) if cross else ()):
            if isinstance(layer, nn.Linear) and eligible(layer):
                yield layer


@contextlib.contextmanager
def fp8_layers(modules, enabled: bool = True):
    """Within the block, the blocks' linear layers of ``modules`` (:func:`block_layers`) multiply in FP8
    (``enabled``; False leaves them as they are); their flags are restored on exit."""
    layers = [layer for m in modules if m is not None for layer in block_layers(m)] if enabled else []
    before = [layer.__dict__.get("fp8") for layer in layers]
    for layer in layers:
        layer.fp8 = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, before):
            if flag is None:
                layer.__dict__.pop("fp8", None)
            else:
                layer.fp8 = flag


def check_supported(device: torch.device) -> None:
    """Raise a clear error where FP8 products cannot run: CUDA GPUs before compute capability 8.9 (Ada,
    Hopper and later have e4m3 tensor cores) and devices other than CUDA and the CPU (where ``_scaled_mm``
    runs them slowly: tests, debugging)."""
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"generate(fp8=True) runs on CUDA GPUs of compute capability 8.9 or later (and slowly on "
                           f"the CPU), not on {device.type}. Generate with fp8=False.")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise RuntimeError(f"generate(fp8=True) needs FP8 tensor cores (compute capability 8.9 or later: Ada, "
                               f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} has {major}.{minor}. "
                               f"Generate with fp8=False.")
