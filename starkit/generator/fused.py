"""A block's sampling step with its element-wise work fused by ``torch.compile``.

In eager mode a block of the generator runs about thirty element-wise passes over its activations
besides the matrix products and attention: three LayerNorms and their casts, the float32 QK L2-norm
and rotary of queries and keys (and of the cross-attention queries), GELU and the residual
additions. At d30 @1024 with batch 16 each pass over the last scale moves 0.5-1 GB. Here those
passes are four compiled regions per block, cut around what must stay outside them (the KV-cache
write and the two attentions)::

    attention_inputs     LayerNorm -> qkv -> QK-norm, rotary -> q (token-major), k, v
    (eager)              KV-cache append, self-attention
    cross_inputs         x + proj(out) -> LayerNorm -> q -> QK-norm            (blocks with text)
    (eager)              cross-attention to the text keys/values
    ffn_inputs           x + proj(out) -> LayerNorm
    (eager)              fc1 with bias and GELU in the matrix product's epilogue (fc1_gelu)
    ffn_output           x + fc2(...)

With ``generate(fp8=True)`` (:mod:`starkit.generator.fp8`) the same regions take e4m3 weights and their
scales: each region quantizes the inputs of its products (a row maximum and a cast, fused with the
LayerNorm or residual before it), fc1 moves into ``ffn_inputs`` and its GELU into ``ffn_output``, fused with
the quantization of fc2's input (cuBLASLt's GELU epilogue has no FP8 row-wise form).

The regions are plain functions of tensors: the weights come in already cast to the autocast dtype
(:func:`~starkit.generator.blocks.autocast_weight`, once per weight version), so no cast runs
inside them, and they run with autocast off (their dtypes are explicit), so that the graphs do not
depend on the caller's autocast settings. Only the activations' batch and token dimensions are
symbolic (weights, head count and eps are constants of the graph): two graphs per region and model
width serve every scale and batch size, one of them for the single-token first scale (a test counts
them). The results equal the
eager block's up to floating-point rounding (tests/test_generator.py); AdaLN (VAR) blocks, blocks
in training mode and training itself run eagerly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from starkit.generator import fp8, kv_cache
from starkit.generator.blocks import (Block, KVCache, autocast_weight, fc1_gelu, l2_normalize, take_rows,
                                      token_major)
from starkit.positional import as_cis, rotate_float32
from starkit.utils.inference_cache import autocast_dtype


def attention_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, q_scale: torch.Tensor,
                     rotary: Optional[Tuple[torch.Tensor, torch.Tensor]], num_heads: int, eps: float,
                     weight_scale: Optional[torch.Tensor] = None):
    """``x`` ``(B, l, C)`` -> normalised, rotated queries and keys and the values, ``(B, H, l, d)`` each; the
    queries and keys laid out token-major (:func:`~starkit.generator.blocks.token_major`: the attention's
    output then needs no transpose copy, and the keys go to the token-major KV cache as whole rows). Writing
    the keys and values into the KV cache inside the region was measured slower with the symbolic shapes used
    here (``benchmarks/bench_attention_layouts.py --dynamic``). ``weight_scale``: an e4m3 ``weight`` and its
    scales (:func:`~starkit.generator.fp8.linear`), or None; ``bias`` is in the compute dtype."""
    B, l, C = x.shape
    h = F.layer_norm(x.float(), (C,), eps=eps).to(bias.dtype)  # (B, l, C)
    qkv = fp8.linear(h, weight, bias, weight_scale).view(B, l, 3, num_heads, C // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, l, d)
    qf, kf = l2_normalize(q, q_scale), l2_normalize(k)  # (B, H, l, d) float32
    if rotary is not None:
        qf, kf = rotate_float32(qf, rotary), rotate_float32(kf, rotary)
    k = kf.to(v.dtype)
    return token_major(qf.to(v.dtype)), token_major(k) if kv_cache.KV_TOKEN_MAJOR else k, v  # k as the cache stores it


def _project(out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             weight_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    B, H, l, d = out.shape
    return fp8.linear(out.transpose(1, 2).reshape(B, l, H * d), weight, bias, weight_scale)  # (B, l, C)


def cross_inputs(x: torch.Tensor, out: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor,
                 q_w: torch.Tensor, q_b: torch.Tensor, q_scale: torch.Tensor, eps: float,
                 proj_s: Optional[torch.Tensor] = None, q_s: Optional[torch.Tensor] = None):
    """The self-attention's residual, then the cross-attention's queries ``(B, H, l, d)``. ``proj_s``, ``q_s``:
    FP8 weights' scales, or None."""
    x = x + _project(out, proj_w, proj_b, proj_s)  # (B, l, C)
    B, l, C = x.shape
    H = out.shape[1]
    h = F.layer_norm(x.float(), (C,), eps=eps).to(q_b.dtype)
    q = fp8.linear(h, q_w, q_b, q_s).view(B, l, H, C // H).transpose(1, 2)  # (B, H, l, d)
    return x, l2_normalize(q, q_scale).to(out.dtype)


def ffn_inputs(x: torch.Tensor, out: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor, eps: float,
               dtype: torch.dtype, proj_s: Optional[torch.Tensor] = None, fc1: Optional[tuple] = None):
    """The last attention's residual ``x`` ``(B, l, C)`` and the FFN's normalised input (in ``dtype``), or
    with ``fc1`` (FP8 ``(weight, bias, scale)``) fc1's output before the GELU ``(B, l, 4C)``."""
    x = x + _project(out, proj_w, proj_b, proj_s)
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(dtype)
    return x, h if fc1 is None else fp8.linear(h, *fc1)


def ffn_output(x: torch.Tensor, g: torch.Tensor, fc2_w: torch.Tensor, fc2_b: torch.Tensor,
               fc2_s: Optional[torch.Tensor] = None, gelu: bool = False) -> torch.Tensor:
    """The FFN's residual: ``x + fc2(g)`` ``(B, l, C)``, with g = GELU(fc1(h)) ``(B, l, 4C)`` (``gelu``: g is
    fc1's output and the GELU is applied here)."""
    return x + fp8.linear(g, fc2_w, fc2_b, fc2_s, gelu=gelu)


# which dimensions of which arguments vary between calls: x (rows, tokens), out (rows, tokens), rotary (tokens)
_DYNAMIC_DIMS = {"attention_inputs": {0: (0, 1), 4: (0,)}, "cross_inputs": {0: (0, 1), 1: (0, 2)},
                 "ffn_inputs": {0: (0, 1), 1: (0, 2)}, "ffn_output": {0: (0, 1), 1: (0, 1)}}


def run_compiled(fn, *args):
    """``fn(*args)`` compiled (``dynamic=False``, built once: :func:`~starkit.utils.compiling.compile_once`)
    with the activations' varying dimensions marked dynamic (sizes of 1 stay static), autocast off."""
    from starkit.utils.compiling import compile_errors_named, compile_once, inference_options
    for i, axes in _DYNAMIC_DIMS[fn.__name__].items():
        for t in (args[i] if isinstance(args[i], tuple) else (args[i],)):
            for axis in axes if t is not None else ():
                torch._dynamo.maybe_mark_dynamic(t, axis)
    with torch.autocast(args[0].device.type, enabled=False), \
            compile_errors_named(f"{fn.__name__} for compile_blocks", "compile_blocks=False"):
        return compile_once(fn, options=inference_options(args[0].device), dynamic=False)(*args)


def tune_at_largest_scale(net, x: torch.Tensor, text_kvs=None, text_bias: Optional[torch.Tensor] = None) -> None:
    """Run the compiled regions once on zeros at ``net``'s largest scale (``x``'s rows, no KV cache) before
    their first real call, so that their kernels are tuned where the time goes
    (:func:`~starkit.utils.compiling.tune_first_at`; once per process and graph kind)."""
    from starkit.utils.compiling import tune_first_at
    block = net.blocks[0]
    if block.training or hasattr(block, "ada_lin"):
        return
    device, tokens = x.device, net.patch_nums[-1] ** 2
    key = ("fused_regions", str(device), x.dtype, autocast_dtype(x), net.width, net.num_heads, block.norm.eps,
           text_kvs is not None, x.shape[0] == 1)

    def call():
        rotary = net.positional.rotary(slice(net.seq_len - tokens, net.seq_len))
        rotary = None if rotary is None else tuple(t.clone() for t in rotary)
        fused_block(block, x.new_zeros(x.shape[0], tokens, net.width), rotary, text_kvs[0] if text_kvs else None,
                    text_bias)
    tune_first_at(key, device, call)


def fused_block(block: Block, x: torch.Tensor, rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                text_kv=None, text_bias: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                query_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``block(x, rotary=..., text_kv=..., text_bias=..., cache=..., query_rows=...)`` at inference with the
    compiled regions. ``rotary``: the real ``(cos, sin)`` tables of the tokens (not the complex form), or None.
    ``query_rows`` ``(B, h)``: only those tokens' outputs (after the self-attention's inputs, which need all
    tokens, everything runs on the h rows). A block in training mode with drop-path runs eagerly (drop-path
    is random)."""
    if block.training or hasattr(block, "ada_lin"):
        return block(x, rotary=as_cis(rotary), text_kv=text_kv, text_bias=text_bias, cache=cache,
                     query_rows=query_rows)
    attn, eps = block.attn, block.norm.eps
    qkv_w, qkv_b, qkv_s = fp8.weights(attn.mat_qkv, x, attn._qkv_bias(x))
    q, k, v = run_compiled(attention_inputs, x, qkv_w, qkv_b, attn.qk_norm.scale(), rotary, attn.num_heads, eps,
                           qkv_s)
    if cache is not None:
        k, v = cache.append(k, v)
    if query_rows is not None:
        q, x = take_rows(q, query_rows, dim=2), take_rows(x, query_rows, dim=1)  # (B, H, h, d), (B, h, C)
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, H, l, d)
    proj_w, proj_b, proj_s = fp8.weights(attn.proj, x)
    cross = block.cross_attn
    if cross is not None and text_kv is not None:
        q_w, q_b, q_s = fp8.weights(cross.mat_q, x, autocast_weight(cross, "q_bias", cross.q_bias, x))
        x, q = run_compiled(cross_inputs, x, out, proj_w, proj_b, q_w, q_b, cross.qk_norm.scale(), eps, proj_s, q_s)
        text_k, text_v = text_kv
        out = F.scaled_dot_product_attention(q, text_k.to(text_v.dtype), text_v, attn_mask=text_bias.to(text_v.dtype),
                                             scale=1.0)
        proj_w, proj_b, proj_s = fp8.weights(cross.proj, x)
    fc1_w, fc1_b, fc1_s = fp8.weights(block.ffn.fc1, x)
    fc2 = fp8.weights(block.ffn.fc2, x)  # (weight, bias, scale or None)
    if fc1_s is None:  # bf16: GELU in fc1's epilogue (cuBLASLt)
        x, h = run_compiled(ffn_inputs, x, out, proj_w, proj_b, eps, fc1_w.dtype, proj_s)
        return run_compiled(ffn_output, x, fc1_gelu(h, fc1_w, fc1_b), *fc2)
    x, f = run_compiled(ffn_inputs, x, out, proj_w, proj_b, eps, fp8.compute_dtype(x), proj_s, (fc1_w, fc1_b, fc1_s))
    return run_compiled(ffn_output, x, f, *fc2, True)  # GELU fused with fc2's input quantization
