"""STAR's sampler head: a small transformer that predicts the tokens of one scale from the
generator's hidden states of that scale and the tokens of the scale revealed so far.

Sequence (per scale, ``l = pn**2`` tokens, full attention, no cross-attention)::

    [ prefix ; x_1 .. x_l ]
    prefix = encoder_proj(pooled text) + pos_start
    x_i    = word_embed(revealed embedding_i, zeros where hidden) + lvl_embed(scale)
    input  = proj(concat(part, hidden part))   # Linear(2C, C); the prefix is concat(prefix, prefix)

then ``depth`` blocks (RoPE from the generator: the prefix at the (0, 0) position), a
non-affine LayerNorm and its own logits head Linear(C, V). This is the structure of the
official ``feat_extract_blocks`` / ``head_proj`` / ``word_embed_head`` / ``lvl_embed_2`` /
``pos_start_last`` / ``encoder_proj2`` / ``head_logits2`` (names here: ``blocks``, ``proj``,
``word_embed``, ``lvl_embed``, ``pos_start``, ``encoder_proj``, ``head_logits``), so that
weights of that layout map one to one.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from starkit.generator import fp8
from starkit.generator.blocks import Block, Linear
from starkit.positional import as_cis
from starkit.utils.inference_cache import autocast_dtype, inference_cached, inference_param

if TYPE_CHECKING:
    from starkit.samplers.head_graphs import HeadStepGraphs


def _cat_rotary(first: Optional[tuple], scale: Optional[tuple]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Rotary tables of [prefix; scale tokens] ``(1 + l, d/2)`` each, or None without RoPE."""
    if first is None or scale is None:
        return None
    return torch.cat([first[0], scale[0]], dim=0), torch.cat([first[1], scale[1]], dim=0)


class SamplerHead(nn.Module):
    """The sampler head's weights and forward pass.

    Args:
        width: C, the generator's width (the head runs at the same width and heads).
        text_dim: width of the pooled text features.
        latent_dim: Cvae, the tokenizer's embedding width.
        vocab_size: V.
        num_heads: attention heads (the generator's, so its rotary tables fit).
        num_scales: K (the level embedding has one row per scale).
        depth: number of blocks.
        mlp_ratio: FFN width / width.
        norm_eps: epsilon of the blocks' and the logits head's LayerNorms.
    """

    def __init__(self, width: int, text_dim: int, latent_dim: int, vocab_size: int, num_heads: int,
                 num_scales: int, depth: int = 3, mlp_ratio: float = 4.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.width, self.depth = width, depth
        self.word_embed = Linear(latent_dim, width)
        self.encoder_proj = Linear(text_dim, width)
        self.pos_start = nn.Parameter(torch.empty(1, 1, width))
        self.lvl_embed = nn.Embedding(num_scales, width)
        self.proj = Linear(2 * width, width)
        self.blocks = nn.ModuleList(Block(width, num_heads, None, mlp_ratio, drop_path=0.0, norm_eps=norm_eps)
                                    for _ in range(depth))
        self.logit_norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.head_logits = Linear(width, vocab_size)
        self.init_weights()

    def init_weights(self, init_head: float = 0.02) -> None:
        """VAR's init: trunc-normal std sqrt(1/(3C)), logits head x0.02, output projections / sqrt(2 depth)."""
        std = math.sqrt(1 / self.width / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_start, std=std)
        self.head_logits.weight.data.mul_(init_head)
        for block in self.blocks:
            block.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))

    def forward(self, hidden: torch.Tensor, revealed: torch.Tensor, pooled: torch.Tensor, scale: int,
                rotary_first: Optional[tuple] = None, rotary: Optional[tuple] = None,
                fused: bool = False, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of the tokens of one scale (all, or those at ``positions``) given the revealed ones.

        Args:
            hidden: the generator's hidden states of the scale ``(R, l, C)``.
            revealed: embeddings of the revealed tokens, zeros where hidden ``(R, l, Cvae)``.
            pooled: pooled text features ``(R, Dt)``.
            scale: the scale index k (level embedding).
            rotary_first, rotary: rotary tables of the (0, 0) position and of the scale's tokens.
            fused: run the blocks with their element-wise work in compiled regions
                (:func:`starkit.generator.fused.fused_block`; inference only).
            positions: ``(R, h)`` token positions whose logits are wanted (the still hidden ones when
                sampling), or None for all ``l``. The last block computes only these tokens' outputs
                (its keys and values come from all tokens).

        Returns:
            float32 logits ``(R, l, V)``, or ``(R, h, V)`` with ``positions``.
        """
        return self.trunk(self.embed_inputs(hidden, revealed, pooled, scale), _cat_rotary(rotary_first, rotary),
                          fused=fused, positions=positions)

    def embed_inputs(self, hidden: torch.Tensor, revealed: torch.Tensor, pooled: torch.Tensor,
                     scale: int) -> torch.Tensor:
        """The blocks' input ``proj([prefix; revealed + level] ++ [prefix; hidden])`` ``(R, 1 + l, C)``."""
        prefix = self.encoder_proj(pooled)[:, None, :] + self.pos_start  # (R, 1, C)
        level = self.lvl_embed.weight[scale]  # (C,)
        part = self.word_embed(revealed.to(hidden.dtype)) + level  # (R, l, C)
        x = torch.cat([torch.cat([prefix, part], dim=1),
                       torch.cat([prefix.to(hidden.dtype), hidden], dim=1)], dim=-1)  # (R, 1 + l, 2C)
        return self.proj(x)  # (R, 1 + l, C)

    def trunk(self, x: torch.Tensor, rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
              fused: bool = False, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The blocks, the norm and the logits head: ``(R, 1 + l, C)`` -> float32 logits ``(R, l, V)``.
        ``rotary``: the (cos, sin) tables of ``[prefix; scale tokens]``, or None. ``fused``: blocks with
        compiled element-wise regions (:mod:`starkit.generator.fused`). ``positions`` ``(R, h)``: only
        these tokens get logits ``(R, h, V)``; the last block, the norm and the logits head run on h rows."""
        if positions is None:
            return self.logits(self.run_blocks(x, rotary, fused)[:, 1:])  # the prefix has no logits
        return self.logits(self.run_blocks(x, rotary, fused, rows=positions + 1))  # (+1: past the prefix)

    def run_blocks(self, x: torch.Tensor, rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   fused: bool = False, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The blocks: ``(R, 1 + l, C)`` -> ``(R, 1 + l, C)``, or with ``rows`` ``(R, h)`` (indices into the
        ``1 + l`` tokens) the last block's output at those tokens only, ``(R, h, C)``."""
        if fused and not torch.compiler.is_compiling():
            from starkit.generator.fused import fused_block
            run = functools.partial(fused_block, rotary=rotary)
        else:  # complex tables, built once for all blocks; compiled code keeps (cos, sin)
            run = functools.partial(Block.__call__, rotary=rotary if torch.compiler.is_compiling() else as_cis(rotary))
        for i, block in enumerate(self.blocks):
            x = run(block, x, query_rows=rows if i == len(self.blocks) - 1 else None)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Token features ``(R, n, C)`` -> float32 logits ``(R, n, V)`` (the final norm and the logits head)."""
        return self.head_logits(self.logit_norm(x)).float()

    def revealed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """``proj.weight[:, :C] @ word_embed.weight`` ``(C, Cvae)``: what a revealed embedding adds to the
        blocks' input (the input is linear in it), formed once per weight version at inference."""
        return inference_param(self, "revealed_weight", (self.proj.weight, self.word_embed.weight),
                               lambda: self.proj.weight[:, :self.width].float() @ self.word_embed.weight.float(), x)

    def for_scale(self, hidden: torch.Tensor, pooled: torch.Tensor, scale: int, rotary_first: Optional[tuple] = None,
                  rotary: Optional[tuple] = None, fused: bool = False, compiled: bool = False,
                  graphs: Optional["HeadStepGraphs"] = None, largest_tokens: Optional[int] = None):
        """Sampling one scale over several reveal steps: what does not change between the steps is computed
        once. The blocks' input is ``proj`` of a concatenation, linear in the revealed embeddings, so it is
        ``base + revealed @ revealed_weight.T`` with ``base`` (the input with nothing revealed) formed here.

        Args:
            hidden, pooled, scale, rotary_first, rotary: as in :meth:`forward`, fixed for the scale.
            fused: the blocks' compiled regions (``generate(compile_blocks=True)``).
            compiled: the blocks under ``torch.compile`` (``StableSampler(compile_head=True)``; dynamic shapes).
            graphs: the steps replayed from CUDA graphs kept there (:mod:`starkit.samplers.head_graphs`;
                ``generate(cuda_graphs=True)``).
            largest_tokens: with ``compiled``, the token count of the generation's largest scale: the compiled
                blocks run once at that size (zeros, all rows and half of them) before their first real call,
                so that their kernels are tuned where the time goes
                (:func:`~starkit.utils.compiling.tune_first_at`).

        Returns:
            ``predict(revealed, positions=None)``: revealed embeddings ``(R', l, Cvae)`` and the positions
            ``(R', h)`` whose logits are wanted (None: all; ``R'`` divides R: the guided halves share them) ->
            float32 logits ``(R, h, V)``; equal to :meth:`forward` up to rounding. The blocks are called
            directly: forward hooks on the head and an overridden :meth:`forward` are not run (a subclass
            can override :meth:`embed_inputs` and :meth:`_input_and_blocks`).
        """
        R, l = hidden.shape[:2]
        base = self.embed_inputs(hidden, hidden.new_zeros(R, l, self.word_embed.in_features), pooled, scale)
        rot = _cat_rotary(rotary_first, rotary)
        weight = self.revealed_weight(base).to(base.dtype)  # (C, Cvae)
        runner = self
        if compiled:
            from starkit.utils.compiling import compile_errors_named, compile_once, inference_options, recompile_limit
            blocks = compile_once(type(self)._input_and_blocks, options=inference_options(base.device), dynamic=True)
            runner = self.with_blocks_in_autocast_dtype(base)
        else:
            blocks = type(self)._input_and_blocks

        def features(base: torch.Tensor, rot, revealed: torch.Tensor, positions: Optional[torch.Tensor]):
            """The last block's output at the wanted tokens ``(R, h, C)`` (all but the prefix without positions)."""
            revealed = revealed.repeat(R // revealed.shape[0], 1, 1)  # (R, l, Cvae): the halves' shared rows
            if positions is not None and positions.shape[0] != R:
                positions = positions.repeat(R // positions.shape[0], 1)  # (R, h)
            added = F.linear(revealed.to(base.dtype), weight)  # (R, l, C)
            rows = None if positions is None else positions + 1  # past the prefix
            if compiled:
                for t, dim in ((base, 2), (added, 2), *((table, 1) for table in rot or ())):
                    torch._dynamo.mark_static(t, dim)  # widths: not unified with a token count of the same size
                device = base.device.type  # the autocast cache flag is in the graph's guards: always off here
                # (CUDA graphs turn it off), so one graph serves calls with and without them (its linear layers
                # are in the autocast dtype already: nothing for the cache to keep)
                with compile_errors_named("the sampler head for compile_head", "compile_head=False"), \
                        recompile_limit(64), \
                        torch.autocast(device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device),
                                       cache_enabled=False):  # graphs: (all / some rows) x (one row / more) x widths
                    x = blocks(runner, base, added, rot, rows, False)
            else:
                x = blocks(self, base, added, rot, rows, fused)
            return x if rows is not None else x[:, 1:]

        if compiled and largest_tokens and largest_tokens > l:
            from starkit.utils.compiling import tune_first_at
            key = ("sampler_head", type(self), str(base.device), base.dtype, autocast_dtype(base), self.width,
                   rot is None, R == 1)
            tune_first_at(key, base.device, lambda: self._run_at_size(features, base, rot, largest_tokens))

        if graphs is not None:  # the blocks, norm and logits head of each step replayed; float32 outside
            replay = graphs.predictor(self, base, rot, lambda *args: self.head_logits(self.logit_norm(features(*args))),
                                      form=(compiled, fused and not compiled))
            return lambda revealed, positions=None: replay(revealed, positions).float()
        return lambda revealed, positions=None: self.logits(features(base, rot, revealed, positions))

    def _run_at_size(self, features, base: torch.Tensor, rot, tokens: int) -> None:
        """``features`` (of :meth:`for_scale`) on zeros of ``tokens`` tokens, with all rows and with half of them."""
        R, C = base.shape[0], base.shape[-1]
        big = base.new_zeros(R, 1 + tokens, C)
        big_rot = None if rot is None else tuple(t[:1].expand(1 + tokens, *t.shape[1:]).contiguous() for t in rot)
        revealed = base.new_zeros(R, tokens, self.word_embed.in_features)
        features(big, big_rot, revealed, None)
        features(big, big_rot, revealed, torch.arange(tokens // 2, device=base.device).expand(R, -1).contiguous())

    def with_blocks_in_autocast_dtype(self, x: torch.Tensor) -> "SamplerHead":
        """This head with its blocks' linear layers in the autocast dtype of ``x``'s device (a shallow copy
        sharing every other module; the blocks copied and cast once per weight version, and kept), or the head
        itself without autocast. A compiled graph reading float32 weights under autocast casts each of them
        at every call (graphs cannot keep :func:`inference_param`'s cast copies): four weight matrices per
        block at every reveal step. Only the linear layers are cast (autocast casts them too); the query
        scale stays float32. Layers in FP8 mode (:mod:`starkit.generator.fp8`) get their e4m3 weights and
        scales stored in the copy (:func:`~starkit.generator.fp8.pack`), one copy per set of such layers."""
        if not torch.is_autocast_enabled(x.device.type) or torch.is_grad_enabled():
            return self
        dtype = torch.get_autocast_dtype(x.device.type)
        in_fp8 = tuple(i for i, layer in enumerate(fp8.block_layers(self.blocks)) if fp8.active(layer))

        def build() -> "SamplerHead":
            blocks = nn.ModuleList(copy.deepcopy(block) for block in self.blocks).requires_grad_(False)
            for module in blocks.modules():
                module.__dict__.pop("_inference_cache", None)  # (copied with the blocks)
                if isinstance(module, nn.Linear):
                    module.to(dtype)
            for layer in fp8.block_layers(blocks):
                if fp8.active(layer):
                    fp8.pack(layer)
            shell = copy.copy(self)
            shell.__dict__ = {k: v for k, v in self.__dict__.items() if k != "_inference_cache"}
            shell._modules = dict(self._modules, blocks=blocks)
            return shell
        return inference_cached(self, f"blocks_in:{dtype}:fp8{in_fp8}", tuple(self.blocks.parameters()), build)

    def _input_and_blocks(self, base: torch.Tensor, added: torch.Tensor, rotary, rows, fused: bool) -> torch.Tensor:
        """``base`` ``(R, 1 + l, C)`` plus ``added`` ``(R, l, C)`` on the tokens, then :meth:`run_blocks`."""
        return self.run_blocks(torch.cat([base[:, :1], base[:, 1:] + added], dim=1), rotary, fused, rows)

    def compiled_forward(self):
        """:meth:`forward` for sampling with the blocks under ``torch.compile`` (:meth:`for_scale` with
        ``compiled=True``; dynamic shapes: a graph for all rows and one for some rows serve every scale,
        batch size and number of hidden rows, plus one or two for a single row, per width). The compiled
        function is the class's, shared by all heads and holding none of them: copies and pickles of a head
        are unaffected, and each head runs with its own weights."""
        def forward(hidden, revealed, pooled, scale, rotary_first=None, rotary=None, positions=None):
            return self.for_scale(hidden, pooled, scale, rotary_first, rotary, compiled=True)(revealed, positions)
        return forward
