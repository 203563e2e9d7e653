"""The scale-wise transformer (STAR's generator network) and its named sizes.

Sequence layout: position block k holds the ``pn_k**2`` tokens of scale k (row-major).
Block 0 is the start (SOS) token built from the pooled text; block k >= 1 is the
word embedding of the teacher-forcing input of scale k (the tokenizer's ``f_hat`` after
scales < k, area-downsampled). A learned level embedding marks each token's scale.
Self-attention is block-causal: a token sees every token of its own and earlier scales.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from starkit.generator.blocks import AdaLNBeforeHead, Block, KVCache, Linear, key_padding_bias
from starkit.positional import PositionalEncoding, as_cis

ATTENTIONS = ("sdpa", "flex")  # training self-attention implementations (ScaleTransformer.attention)
COMPILE_OPTIONS: dict = {}  # extra torch.compile arguments of the training blocks (tests use backend="eager")

# Named sizes: width 64*depth and heads = depth (head dim 64), as VAR and STAR.
SIZES = {
    "tiny": dict(depth=2, width=32, num_heads=2),
    "small": dict(depth=6, width=384, num_heads=6),
    "d16": dict(depth=16, width=1024, num_heads=16),
    "d20": dict(depth=20, width=1280, num_heads=20),
    "d24": dict(depth=24, width=1536, num_heads=24),
    "d30": dict(depth=30, width=1920, num_heads=30),
}


def resolve_size(size: str, depth: Optional[int] = None, width: Optional[int] = None,
                 num_heads: Optional[int] = None) -> dict:
    """The (depth, width, num_heads) of a named size, with explicit values taking precedence."""
    if size not in SIZES:
        raise ValueError(f"Unknown generator size {size!r}; choose one of {sorted(SIZES)} or set depth/width/num_heads.")
    cfg = dict(SIZES[size])
    for key, value in (("depth", depth), ("width", width), ("num_heads", num_heads)):
        if value is not None:
            cfg[key] = int(value)
    if cfg["width"] % cfg["num_heads"]:
        raise ValueError(f"width {cfg['width']} is not divisible by num_heads {cfg['num_heads']}.")
    return cfg


def scale_levels(patch_nums: Sequence[int]) -> torch.Tensor:
    """Scale index of every position, ``(L,)``."""
    return torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(patch_nums)])


class ScaleTransformer(nn.Module):
    """The generator network: embeddings, ``depth`` blocks, and the logits head.

    Args:
        patch_nums: side of each scale's token map.
        vocab_size: V, the tokenizer's codebook size.
        latent_dim: Cvae, the tokenizer's embedding width.
        text_dim: width of the text features (None: no cross-attention, e.g. class-conditional).
        depth: number of blocks.
        width: model width C.
        num_heads: attention heads (head dim ``width // num_heads``).
        positional: the positional encoding (built by the generator).
        mlp_ratio: FFN width / model width.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        head_norm: non-affine LayerNorm before the logits head (STAR's ``logit_norm``).
        norm_eps: epsilon of every LayerNorm of the blocks and the head.
        cond_dim: width of the conditioning vector that becomes the start token (default text_dim).
        adaln: VAR's AdaLN: every block gets ``ada_lin`` (scale/shift/gamma from the condition
            vector) and the head norm becomes ``head_nm`` (AdaLN before the head) instead of
            ``logit_norm``. The condition is the pooled vector (VAR: the class embedding).
        start_from_condition: "proj": start token = ``encoder_proj(pooled) + pos_start`` (STAR);
            "identity": ``pooled + pos_start`` (VAR: the class embedding is the start token;
            needs cond_dim == width).
    """

    def __init__(self, patch_nums: Sequence[int], vocab_size: int, latent_dim: int, text_dim: Optional[int],
                 depth: int, width: int, num_heads: int, positional: PositionalEncoding, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, head_norm: bool = True, norm_eps: float = 1e-6,
                 cond_dim: Optional[int] = None, adaln: bool = False, start_from_condition: str = "proj") -> None:
        super().__init__()
        self.patch_nums = tuple(patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.seq_len = sum(p * p for p in self.patch_nums)
        self.width, self.depth, self.num_heads, self.vocab_size = width, depth, num_heads, vocab_size
        self.activation_checkpointing = False
        self.compile_blocks = False  # teacher-forced passes with gradients run torch.compile'd blocks
        self.attention = "sdpa"

        cond_dim = cond_dim or text_dim
        if start_from_condition not in ("proj", "identity"):
            raise ValueError(f"start_from_condition must be 'proj' or 'identity', got {start_from_condition!r}.")
        if start_from_condition == "identity" and cond_dim != width:
            raise ValueError(f"start_from_condition='identity' needs cond_dim == width, got {cond_dim} and {width}.")
        self.adaln = adaln
        self._cond = None  # AdaLN: the last condition given to forward/start_tokens (see _adaln_cond)
        self.word_embed = Linear(latent_dim, width)
        if start_from_condition == "proj":
            self.encoder_proj = Linear(cond_dim, width)  # pooled condition -> start token
        else:
            self.encoder_proj = nn.Identity()
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, width))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), width)
        self.positional = positional
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(width, num_heads, text_dim, mlp_ratio, drop_path=rates[i], norm_eps=norm_eps,
                  **({"adaln_cond_dim": cond_dim} if adaln else {})) for i in range(depth)
        )
        self.logit_norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False) if head_norm else nn.Identity()
        if adaln:
            self.logit_norm = nn.Identity()
            self.head_nm = AdaLNBeforeHead(width, cond_dim, norm_eps)
        self.head_logits = Linear(width, vocab_size)

        levels = scale_levels(self.patch_nums)
        self.register_buffer("levels", levels, persistent=False)  # (L,)
        self.register_buffer("block_causal", levels[:, None] >= levels[None, :], persistent=False)  # (L, L)
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self, init_head: float = 0.02, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5) -> None:
        """VAR's initialisation: trunc-normal std sqrt(1/(3C)); head x0.02; output projections
        of attention and FFN divided by sqrt(2*depth); with AdaLN, VAR's scaling of ``ada_lin``
        (scale/shift rows x init_adaln, gamma rows x init_adaln_gamma, head_nm x init_adaln)."""
        std = math.sqrt(1 / self.width / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        nn.init.trunc_normal_(self.pos_start, std=std)
        self.head_logits.weight.data.mul_(init_head)
        for block in self.blocks:
            block.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
        if self.adaln:
            for block in self.blocks:
                block.ada_lin[-1].weight.data[2 * self.width:].mul_(init_adaln)
                block.ada_lin[-1].weight.data[:2 * self.width].mul_(init_adaln_gamma)
            self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)

    def _adaln_cond(self, cond: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The AdaLN condition: ``cond`` when given, else the pooled vector of the last
        ``forward`` / ``start_tokens`` call (so callers written for STAR need no change)."""
        if not self.adaln:
            return None
        cond = self._cond if cond is None else cond
        if cond is None:
            raise ValueError("This transformer uses AdaLN: call forward/start_tokens first or pass `cond`.")
        return cond

    def _block_kwargs(self, cond: Optional[torch.Tensor]) -> dict:
        return {"cond": cond} if self.adaln else {}

    # ------------------------------------------------------------------ embeddings
    def _add_position(self, x: torch.Tensor, positions) -> torch.Tensor:
        x = x + self.lvl_embed(self.levels[positions])
        absolute = self.positional.absolute(positions)
        return x if absolute is None else x + absolute

    def start_tokens(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled condition ``(B, D)`` -> the first scale's input ``(B, first_l, C)``."""
        if self.adaln:
            self._cond = pooled
        sos = self.encoder_proj(pooled)[:, None, :] + self.pos_start  # (B, first_l, C)
        return self._add_position(sos, slice(0, self.first_l))

    def scale_tokens(self, latent_BlC: torch.Tensor, scale: int) -> torch.Tensor:
        """Tokenizer input of scale ``scale`` ``(B, pn**2, Cvae)`` -> ``(B, pn**2, C)``."""
        start = sum(p * p for p in self.patch_nums[:scale])
        end = start + self.patch_nums[scale] ** 2
        return self._add_position(self.word_embed(latent_BlC), slice(start, end))

    def logits(self, hidden: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states ``(B, l, C)`` -> logits ``(B, l, V)`` in float32 (``cond``: AdaLN only)."""
        if self.adaln:
            return self.head_logits(self.head_nm(hidden, self._adaln_cond(cond))).float()
        return self.head_logits(self.logit_norm(hidden)).float()

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, pooled: torch.Tensor, text_tokens: Optional[torch.Tensor], text_mask: Optional[torch.Tensor],
                inputs_BLC: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced pass over all scales (block-causal mask).

        Args:
            pooled: ``(B, D)`` pooled condition.
            text_tokens, text_mask: ``(B, T, Dt)`` and ``(B, T)``; None without cross-attention.
            inputs_BLC: teacher-forcing inputs of scales 1..K-1 ``(B, L - first_l, Cvae)``.
            keep: optional LongTensor of the positions kept (token dropping), sorted: every position
                before the last scale and some of the last scale's.

        Returns:
            hidden states ``(B, L', C)`` (L' = len(keep) when dropping).
        """
        if self.adaln:
            self._cond = pooled
        x = torch.cat([self.encoder_proj(pooled)[:, None, :] + self.pos_start,
                       self.word_embed(inputs_BLC)], dim=1)  # (B, L, C)
        positions = slice(0, self.seq_len) if keep is None else keep
        if keep is not None:
            x = x[:, keep]
        x = self._add_position(x, positions)
        mask = self._training_mask(keep, x.device)
        rotary = self.positional.rotary(positions)  # (cos, sin): what compiled blocks take
        if not (self.compile_blocks and torch.is_grad_enabled()):
            rotary = as_cis(rotary)  # complex tables, built once for all (eager) blocks
        # Each block forms its own text keys/values inside its call: under FSDP a block's weights exist
        # (unsharded) only during that call, and each block uses them once here anyway.
        text_tokens, text_bias = self._text_inputs(text_tokens, text_mask)
        extra = self._block_kwargs(pooled)
        for i in range(len(self.blocks)):
            block = self._training_block(i)
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rotary, mask, None, text_bias, use_reentrant=False,
                               text_tokens=text_tokens, **extra)
            else:
                x = block(x, rotary=rotary, mask=mask, text_bias=text_bias, text_tokens=text_tokens, **extra)
        return x

    def _training_block(self, i: int):
        """Block ``i``, or its ``torch.compile`` wrapper when ``compile_blocks`` is on and gradients are
        (the training step). The wrappers live outside the module tree (state-dict keys unchanged) and
        share their compiled graphs: every block has the same code and shapes, and drop-path rates are
        tensors (only "drop-path on/off" tells blocks apart; a new batch size adds a dynamic-shape
        graph). Passes without gradients (validation, the frozen transformer of the sampler-head
        stage) and cached sampling stay eager."""
        if not (self.compile_blocks and torch.is_grad_enabled()):
            return self.blocks[i]
        from starkit.utils.compiling import compiled_module
        return compiled_module(self, f"_compiled_block_{i}", self.blocks[i], **COMPILE_OPTIONS)

    @property
    def attention(self) -> str:
        """Training self-attention: "sdpa" (dense boolean mask) or "flex" (FlexAttention)."""
        return self._attention

    @attention.setter
    def attention(self, value: str) -> None:
        if value not in ATTENTIONS:
            raise ValueError(f"attention must be 'sdpa' or 'flex', got {value!r}.")
        self._attention = value

    def _training_mask(self, keep: Optional[torch.Tensor], device: torch.device):
        """The block-causal mask of the kept positions: a dense boolean ``(L', L')`` for SDPA, or a
        FlexAttention ``BlockMask`` whose fully masked 128 x 128 blocks are skipped (about half of
        all query-key pairs at 1024)."""
        flex = self.attention == "flex"
        if flex and device.type != "cuda" and torch.is_grad_enabled():  # FlexAttention has no CPU backward
            flex = False
            if not getattr(self, "_warned_flex_cpu", False):
                self._warned_flex_cpu = True
                warnings.warn("attention='flex' trains on CUDA only (FlexAttention has no backward on "
                              f"{device.type}); using the dense block-causal mask (attention='sdpa') here.")
        if not flex:
            return self.block_causal[keep][:, keep] if keep is not None else self.block_causal
        from torch.nn.attention.flex_attention import create_block_mask
        levels = self.levels if keep is None else self.levels[keep]  # (L',)
        # Token dropping keeps every earlier scale and some positions of the last one, so the levels of
        # the kept positions (all the mask depends on) are the same whenever as many are kept: cache by length.
        key = (device, levels.shape[0])
        cache = self.__dict__.setdefault("_flex_masks", {})
        if key not in cache:
            def block_causal(b, h, q, kv):
                return levels[kv] <= levels[q]

            n = levels.shape[0]
            cache[key] = create_block_mask(block_causal, None, None, n, n, device=device)
        return cache[key]

    def _text_inputs(self, text_tokens, text_mask):
        """The text features and their key-padding bias, or ``(None, None)`` without cross-attention."""
        if text_tokens is None or self.blocks[0].cross_attn is None:
            return None, None
        return text_tokens, key_padding_bias(text_mask)

    # ------------------------------------------------------------------ cached sampling
    def text_kv(self, text_tokens: torch.Tensor) -> List[tuple]:
        """Per-block text keys/values, computed once per prompt batch."""
        return [block.cross_attn.text_kv(text_tokens) for block in self.blocks]

    def new_caches(self, batch: int, device, dtype) -> List[KVCache]:
        """Empty preallocated KV caches for a whole generation."""
        head_dim = self.width // self.num_heads
        return [KVCache(batch, self.num_heads, self.seq_len, head_dim, device, dtype) for _ in self.blocks]

    def forward_scale(self, x: torch.Tensor, scale: int, caches: List[KVCache], text_kvs=None,
                      text_bias=None, cond: Optional[torch.Tensor] = None, fused: bool = False) -> torch.Tensor:
        """One scale of cached sampling: ``x`` ``(B, pn**2, C)`` -> hidden ``(B, pn**2, C)``
        (``cond``: AdaLN only; default the pooled vector given to :meth:`start_tokens`).
        ``fused``: the blocks' element-wise work in compiled regions (:mod:`starkit.generator.fused`)."""
        start = sum(p * p for p in self.patch_nums[:scale])
        if fused and not self.adaln:
            from starkit.generator.fused import fused_block, tune_at_largest_scale
            tune_at_largest_scale(self, x, text_kvs, text_bias)
            rotary = self.positional.rotary(slice(start, start + x.shape[1]))  # (cos, sin) or None
            if rotary is not None:  # own storage: a view's offset would be one more size to specialise on
                rotary = tuple(t.clone() for t in rotary)
            for i, block in enumerate(self.blocks):
                x = fused_block(block, x, rotary, text_kvs[i] if text_kvs else None, text_bias, caches[i])
            return x
        rotary = as_cis(self.positional.rotary(slice(start, start + x.shape[1])))
        extra = self._block_kwargs(self._adaln_cond(cond))
        for i, block in enumerate(self.blocks):
            kv = text_kvs[i] if text_kvs else None
            x = block(x, rotary=rotary, mask=None, text_kv=kv, text_bias=text_bias, cache=caches[i], **extra)
        return x

    def no_weight_decay(self) -> set:
        """Names of parameters that get no weight decay (besides all 1-D parameters)."""
        names = {"pos_start", "lvl_embed.weight"}
        names |= {n for n, _ in self.named_parameters() if n.startswith("positional.")}
        return names
