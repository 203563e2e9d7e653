"""Transformer blocks of the scale-wise generator: self-attention with QK L2-norm and
rotary positions (block-causal in training, KV-cached in sampling), cross-attention to
the text tokens, and the FFN.

Parameter names follow the official STAR code (``mat_qkv``, ``q_bias``, ``v_bias``,
``scale_mul_1H11``, ``mat_q``, ``mat_kv``, ``fc1``/``fc2``) so that its checkpoints map
onto these modules one to one.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from starkit.generator import fp8
from starkit.generator.kv_cache import KVCache  # noqa: F401  (re-exported: its former home)
from starkit.positional import as_cis, rotate_float32
from starkit.utils.inference_cache import inference_cached, inference_param


def take_rows(x: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """The tokens ``rows`` ``(B, h)`` of ``x`` along its token dimension ``dim``: ``(B, l, C)`` with dim 1
    -> ``(B, h, C)``; ``(B, H, l, d)`` with dim 2 -> ``(B, H, h, d)``, laid out as ``(B, h, H, d)`` in memory
    (the layout :func:`token_major` gives queries)."""
    if dim == 2 and x.dim() == 4:
        return take_rows(x.transpose(1, 2), rows, dim=1).transpose(1, 2)
    shape = list(x.shape)
    shape[dim] = rows.shape[1]
    index = rows.view(rows.shape[0], *([1] * (dim - 1)), rows.shape[1], *([1] * (x.dim() - dim - 1)))
    return x.gather(dim, index.expand(shape))


def token_major(q: torch.Tensor) -> torch.Tensor:
    """Queries ``(B, H, l, d)`` laid out as ``(B, l, H, d)`` in memory (same values and shape). cuDNN's and
    FlashAttention's SDPA give their output the query's layout, so the output projection's input
    ``out.transpose(1, 2).reshape(B, l, C)`` is then a view, not a copy of the attention output. Applied in
    compiled inference code, where it costs nothing: the kernel that forms the queries writes this layout."""
    return q.transpose(1, 2).contiguous().transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample with probability ``p``.

    The rate lives in an integer buffer (parts per billion), not in a Python number, so that blocks
    with different rates share one ``torch.compile`` graph (a number is specialised per block),
    and no dtype cast (``.to(torch.bfloat16)``, FSDP's buffer dtype) can round it. The rescale
    ``keep / keep_prob`` is formed in float32 and each element is rounded once.

    Args:
        p: probability of dropping the branch for a sample (0: off).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)
        self.active = self.p > 0.0
        self.register_buffer("drop_ppb", torch.tensor(round(self.p * 1e9), dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or not self.training:
            return x
        keep_prob = 1.0 - self.drop_ppb.double().mul(1e-9).float()  # 0-dim float32
        keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device).bernoulli_(keep_prob)
        return (x * (keep / keep_prob)).to(x.dtype)  # (B, 1, ..) float32 factor: one rounding per element


def flex_attention_fn(device: torch.device):
    """``flex_attention``: compiled once per process on CUDA (the fused kernel that skips the masked
    blocks); eager elsewhere (a reference implementation, for tests on the CPU)."""
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        def eager(*args, **kwargs):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "called without torch.compile": intended off the GPU
                return flex_attention(*args, **kwargs)
        return eager
    from starkit.utils.compiling import compile_once
    return compile_once(flex_attention, dynamic=False)


def autocast_weight(module: nn.Module, name: str, tensor: Optional[torch.Tensor], x: torch.Tensor):
    """``tensor`` (a weight or bias of ``module``) in the autocast dtype of ``x``'s device, cast once per
    weight version at inference (:func:`inference_param`); as it is without autocast or with gradients."""
    if tensor is None or not tensor.is_floating_point() or not torch.is_autocast_enabled(x.device.type):
        return tensor
    return inference_param(module, name, (tensor,), lambda: tensor, x)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose weight and bias are cast to the
    autocast dtype once per weight version at inference (:func:`autocast_weight`), or that multiplies in
    FP8 while its ``fp8`` flag is set at inference (:mod:`starkit.generator.fp8`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fp8.active(self):
            return fp8.layer_linear(self, x)
        return F.linear(x, autocast_weight(self, "weight", self.weight, x), autocast_weight(self, "bias", self.bias, x))


def l2_normalize(x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.normalize(x.float(), dim=-1)`` (times ``scale``) with one factor per row, the reciprocal square root
    of the clamped sum of squares (times ``scale``), instead of a division per element: the form used in
    compiled code, where the QK-norm kernels are bound by instructions, not memory (``benchmarks/bench_head.py``).
    Returns float32 of ``x``'s shape; equal to ``F.normalize`` up to rounding (eps 1e-12 on the norm)."""
    xf = x.float()
    factor = xf.square().sum(-1, keepdim=True).clamp_min(1e-24).rsqrt()  # (.., 1)
    return xf * (factor if scale is None else factor * scale)


class QKNorm(nn.Module):
    """L2-normalises queries and keys; queries are then scaled by a learnable per-head
    factor (init 4, clamped at 100), so attention uses scale 1 (VAR's ``attn_l2_norm``).

    Args:
        num_heads: attention heads (one learnable scale each).
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_log_scale = math.log(100.0)

    def scale(self) -> torch.Tensor:
        """The query scale ``exp(min(log_scale, log 100))``, ``(1, H, 1, 1)``."""
        return inference_cached(self, "scale", (self.scale_mul_1H11,),
                                lambda: self.scale_mul_1H11.clamp_max(self.max_log_scale).exp())

    def forward(self, q: torch.Tensor, k: torch.Tensor, cis: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalise (and, given rotary tables ``cis``, rotate) in float32, one cast back each. A rotation
        keeps the norm, so normalising first equals STAR's rotate-then-normalise."""
        if torch.compiler.is_compiling():
            qf, kf = l2_normalize(q, self.scale()), l2_normalize(k)  # (B, H, l, d) float32
        else:
            qf, kf = F.normalize(q.float(), dim=-1).mul(self.scale()), F.normalize(k.float(), dim=-1)
        if cis is not None:
            qf, kf = rotate_float32(qf, cis), rotate_float32(kf, cis)
        q_out, k_out = qf.to(q.dtype), kf.to(k.dtype)
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():  # compiled sampling (the sampler head):
            q_out, k_out = token_major(q_out), token_major(k_out)  # written in the order they are read
        return q_out, k_out


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK L2-norm and optional rotary positions.

    Args:
        width: model width C.
        num_heads: attention heads (head dim ``C // num_heads``).
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_qkv = Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.qk_norm = QKNorm(num_heads)
        self.proj = Linear(width, width)

    def _qkv_bias(self, x: torch.Tensor) -> torch.Tensor:
        """``cat(q_bias, 0, v_bias)``; at inference built once per version of the two biases, in the
        autocast dtype when autocast is on (keyed on the parameters themselves, not on a derived tensor)."""
        return inference_param(self, "qkv_bias", (self.q_bias, self.v_bias),
                               lambda: torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias)), x)

    def forward(self, x: torch.Tensor, rotary: Optional[tuple] = None, mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, query_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` ``(B, l, C)`` -> ``(B, l, C)``; with ``query_rows`` ``(B, h)`` only those tokens' outputs
        ``(B, h, C)`` (keys and values still from all ``l``: the sampler head's last block)."""
        B, l, C = x.shape
        qkv = fp8.layer_linear(self.mat_qkv, x, self._qkv_bias(x)).view(B, l, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, l, d)
        # rotary: (cos, sin), complex tables, or None; compiled graphs keep the real pair (no complex codegen)
        q, k = self.qk_norm(q, k, rotary if torch.compiler.is_compiling() and isinstance(rotary, tuple)
                            else as_cis(rotary))
        if cache is not None:  # sampling: attend to every cached position, no mask needed
            k, v = cache.append(k, v)
        if query_rows is not None:
            if mask is not None:
                raise ValueError("SelfAttention: query_rows with an attention mask is not supported (the mask's "
                                 "query rows would not follow); the sampler head uses full attention.")
            q, l = take_rows(q, query_rows, dim=2), query_rows.shape[1]  # (B, H, h, d)
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask (training)
            out = flex_attention_fn(q.device)(q, k, v, block_mask=mask, scale=1.0)  # (B, H, l, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # (B, H, l, d)
        return self.proj(out.transpose(1, 2).reshape(B, l, C))


class CrossAttention(nn.Module):
    """Attention from image tokens to text tokens (key-padding mask), QK L2-norm.

    The text keys and values depend only on the prompt: :meth:`text_kv` computes them
    once per generation and every scale reuses them.

    Args:
        width: model width C (queries).
        text_dim: width of the text token features (keys and values).
        num_heads: attention heads.
    """

    def __init__(self, width: int, text_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_q = Linear(width, width, bias=False)
        self.mat_kv = Linear(text_dim, 2 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.qk_norm = QKNorm(num_heads)
        self.proj = Linear(width, width)

    def text_kv(self, text_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Text features ``(B, T, Dt)`` -> normalised keys and values ``(B, H, T, d)``."""
        B, T, _ = text_tokens.shape
        bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        kv = F.linear(text_tokens, self.mat_kv.weight, bias).view(B, T, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, d)
        k = F.normalize(k.float(), dim=-1).to(v.dtype)
        return k, v

    def forward(self, x: torch.Tensor, text_kv: Tuple[torch.Tensor, torch.Tensor],
                text_bias: torch.Tensor) -> torch.Tensor:
        B, l, C = x.shape
        bias = autocast_weight(self, "q_bias", self.q_bias, x)  # cached as "q_bias:<dtype>"
        q = fp8.layer_linear(self.mat_q, x, bias).view(B, l, self.num_heads, self.head_dim).transpose(1, 2)
        q = F.normalize(q.float(), dim=-1).mul(self.qk_norm.scale())
        k, v = text_kv
        q = q.to(v.dtype)
        out = F.scaled_dot_product_attention(q, k.to(v.dtype), v, attn_mask=text_bias.to(v.dtype), scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, l, C))


#: device types on which FFN runs fc1 and GELU as one :func:`fc1_gelu` call at inference (a plain ``Linear`` fc1
#: without hooks; the FFN of a module replaced or hooked runs as written)
FC1_GELU_DEVICES = ("cuda",)


@torch.library.custom_op("starkit::fc1_gelu", mutates_args=())
def fc1_gelu(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``GELU_tanh(h @ weight.T + bias)`` ``(..., C)`` -> ``(..., 4C)`` in one matrix product whose epilogue
    applies the bias and GELU on CUDA (cuBLASLt's ``GELU_BIAS`` epilogue, the tanh form, through
    ``torch._addmm_activation``): the activation's pass over the ``(..., 4C)`` tensor is not a kernel of its
    own. An opaque operator, so that ``torch.compile`` calls it as it is (its lowering of
    ``_addmm_activation`` would split the GELU off again). Off CUDA the linear layer and the tanh GELU
    (``_addmm_activation``'s CPU path applies the exact GELU). Inference only: no gradient."""
    if not h.is_cuda:
        return F.gelu(F.linear(h, weight, bias), approximate="tanh")
    return torch._addmm_activation(bias, h.reshape(-1, h.shape[-1]), weight.t(), use_gelu=True).view(
        *h.shape[:-1], weight.shape[0])


@fc1_gelu.register_fake
def _(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return h.new_empty(*h.shape[:-1], weight.shape[0])


class FFN(nn.Module):
    """Two-layer MLP with tanh-approximated GELU.

    Args:
        width: input and output width C.
        hidden: hidden width (``mlp_ratio * C``).
    """

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if fp8.active(fc2) and type(fc2) is Linear and not (fc2._forward_hooks or fc2._forward_pre_hooks):
            return fp8.layer_linear(fc2, fc1(x), gelu=True)  # the GELU with fc2's input quantization (one pass)
        autocast = torch.is_autocast_enabled(x.device.type)
        if (torch.is_grad_enabled() or x.device.type not in FC1_GELU_DEVICES or type(fc1) is not Linear
                or fc1.bias is None or fc1._forward_hooks or fc1._forward_pre_hooks or fp8.active(fc1)
                or (not autocast and x.dtype != fc1.weight.dtype)):  # (a dtype mismatch: the plain layer's error)
            return self.fc2(F.gelu(fc1(x), approximate="tanh"))
        weight = autocast_weight(fc1, "weight", fc1.weight, x)  # inference: GELU in the matrix product's epilogue
        # x in the autocast dtype, as autocast does for F.linear (without autocast it already has the weight's)
        return self.fc2(fc1_gelu(x.to(weight.dtype), weight, autocast_weight(fc1, "bias", fc1.bias, x)))


class Block(nn.Module):
    """Pre-norm block: self-attention, cross-attention to text (optional), FFN.

    Non-affine LayerNorm (eps 1e-6) before each branch; drop-path on self-attention and FFN
    (the cross-attention branch has none, as in STAR).

    With ``adaln_cond_dim`` set (VAR's class-conditional blocks, ``shared_aln=False``) the block
    also owns ``ada_lin = Sequential(SiLU, Linear(D, 6C))``; the condition vector ``cond``
    ``(B, D)`` gives ``gamma1, gamma2, scale1, scale2, shift1, shift2`` and each branch becomes
    ``x + branch(norm(x) * (1 + scale) + shift) * gamma``. Without it nothing changes.

    Args:
        width: model width C.
        num_heads: attention heads.
        text_dim: width of the text token features (None: no cross-attention).
        mlp_ratio: FFN width / C.
        drop_path: drop-path probability of the self-attention and FFN branches.
        norm_eps: epsilon of the LayerNorms.
        adaln_cond_dim: width D of the AdaLN condition vector (None: no AdaLN).
    """

    def __init__(self, width: int, num_heads: int, text_dim: Optional[int], mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, norm_eps: float = 1e-6, adaln_cond_dim: Optional[int] = None) -> None:
        super().__init__()
        self.attn = SelfAttention(width, num_heads)
        self.cross_attn = CrossAttention(width, text_dim, num_heads) if text_dim else None
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)
        if adaln_cond_dim:
            self.ada_lin = nn.Sequential(nn.SiLU(), Linear(adaln_cond_dim, 6 * width))

    def forward(self, x: torch.Tensor, rotary=None, mask=None, text_kv=None, text_bias=None,
                cache: Optional[KVCache] = None, cond: Optional[torch.Tensor] = None,
                query_rows: Optional[torch.Tensor] = None,
                text_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` ``(B, l, C)`` -> ``(B, l, C)``. ``query_rows`` ``(B, h)``: the output of those tokens only,
        ``(B, h, C)``, attending to all ``l`` (the last block of the sampler head, whose logits are wanted
        for the hidden tokens only); not with AdaLN. Cross-attention takes the text keys/values
        ``text_kv`` formed earlier (cached sampling) or forms them here from ``text_tokens`` ``(B, T, Dt)``."""
        if text_kv is None and text_tokens is not None and self.cross_attn is not None:
            text_kv = self.cross_attn.text_kv(text_tokens)
        if hasattr(self, "ada_lin"):
            if query_rows is not None:
                raise ValueError("query_rows is not supported by AdaLN blocks.")
            return self._forward_adaln(x, rotary, mask, text_kv, text_bias, cache, cond)
        out = self.attn(self.norm(x), rotary=rotary, mask=mask, cache=cache, query_rows=query_rows)
        x = (x if query_rows is None else take_rows(x, query_rows, dim=1)) + self.drop_path(out)
        if self.cross_attn is not None and text_kv is not None:
            x = x + self.cross_attn(self.norm(x), text_kv, text_bias)
        return x + self.drop_path(self.ffn(self.norm(x)))

    def _forward_adaln(self, x, rotary, mask, text_kv, text_bias, cache, cond) -> torch.Tensor:
        if cond is None:
            raise ValueError("This block has AdaLN (ada_lin): pass the condition vector `cond` (B, D).")
        ada = self.ada_lin(cond).view(-1, 1, 6, x.shape[-1]).to(x.dtype)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)  # each (B, 1, C)
        h = self.norm(x) * (scale1 + 1) + shift1
        x = x + self.drop_path(self.attn(h, rotary=rotary, mask=mask, cache=cache) * gamma1)
        if self.cross_attn is not None and text_kv is not None:
            x = x + self.cross_attn(self.norm(x), text_kv, text_bias)
        return x + self.drop_path(self.ffn(self.norm(x) * (scale2 + 1) + shift2) * gamma2)


class AdaLNBeforeHead(nn.Module):
    """VAR's ``head_nm``: non-affine LayerNorm, then scale and shift from the condition
    (``ada_lin = Sequential(SiLU, Linear(D, 2C))``).

    Args:
        width: model width C.
        cond_dim: width D of the condition vector.
        norm_eps: epsilon of the LayerNorm.
    """

    def __init__(self, width: int, cond_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(cond_dim, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).to(x.dtype).unbind(2)  # (B, 1, C) each
        return self.norm(x) * (scale + 1) + shift


def key_padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """Key-padding mask ``(B, T)`` (True = real token) -> additive bias ``(B, 1, 1, T)``."""
    mask = mask.clone()
    mask[:, 0] |= ~mask.any(dim=1)  # a prompt with no real token attends to its first slot (no host sync)
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))[:, None, None, :]
