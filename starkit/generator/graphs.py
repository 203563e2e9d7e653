"""Per-scale transformer steps of sampling on static buffers, replayed from CUDA graphs on the GPU.

Batch-1 generation is bound by kernel launches (thousands per scale); a CUDA graph per scale
launches them all at once. A graph replays fixed memory addresses, so everything a scale step
reads or writes lives in buffers kept from call to call: the KV caches, the scale's input
tokens, the text keys/values and padding bias, and the outputs (hidden states and logits).
``ScaleWiseGenerator.generate(..., cuda_graphs=True)`` keeps one :class:`StaticScaleSteps` per
(rows, text length, dtype) and rebuilds it when the transformer's weights change (an optimizer
step, a load). On the CPU the same buffers are used with eager calls, which is what the tests
check; the capture itself runs only on CUDA.

Measured on an H200 (2026-11-29, benchmarks/bench_generate.py --cuda-graphs): batch-1 generation
3.8x faster at d16 @256 and 2.1x at d30 @512 than the same loop without graphs (docs/performance.md).
The static buffers (KV caches of the largest shape used) stay allocated until a call of another
shape or dtype replaces them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from starkit.utils.cuda_graphs import capture, warm_up
from starkit.utils.inference_cache import weights_fingerprint
from starkit.generator.transformer import ScaleTransformer


class StaticScaleSteps:
    """The K scale steps of one generation shape, on static buffers.

    Args:
        net: the transformer (eval mode).
        rows: batch rows (2B with guidance).
        text_kvs: a first call's per-block text keys/values (shapes and dtype of the static copies).
        text_bias: its padding bias ``(rows, 1, 1, T)``.
        dtype: KV-cache dtype.
        fused: run the blocks with their element-wise work compiled (:mod:`starkit.generator.fused`).
    """

    def __init__(self, net: ScaleTransformer, rows: int, text_kvs: Optional[List[tuple]],
                 text_bias: Optional[torch.Tensor], dtype: torch.dtype, fused: bool = False) -> None:
        if net.adaln:
            raise NotImplementedError("cuda_graphs=True does not support AdaLN (VAR) transformers yet: their "
                                      "condition vector is not in a static buffer. Generate with cuda_graphs=False.")
        device = net.pos_start.device
        self.net, self.rows, self.device, self.fused = net, rows, device, fused
        self.fingerprint = weights_fingerprint(net)
        self.caches = net.new_caches(rows, device, dtype)
        self.inputs: List[Optional[torch.Tensor]] = [None] * len(net.patch_nums)  # (rows, pn*pn, C), x's dtype
        self.text_kvs = [(k.clone(), v.clone()) for k, v in text_kvs] if text_kvs else None
        self.text_bias = text_bias.clone() if text_bias is not None else None
        self.starts = [sum(p * p for p in net.patch_nums[:k]) for k in range(len(net.patch_nums))]
        self.outputs: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(net.patch_nums)
        self.graphs: List[Optional["torch.cuda.CUDAGraph"]] = [None] * len(net.patch_nums)
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def matches(self, net: ScaleTransformer, rows: int, text_kvs, dtype: torch.dtype, fused: bool = False) -> bool:
        """Whether this set of buffers serves a call of that shape with the current weights."""
        same_text = (self.text_kvs is None) == (not text_kvs) and (
            not text_kvs or (self.text_kvs[0][0].shape == text_kvs[0][0].shape
                             and self.text_kvs[0][0].dtype == text_kvs[0][0].dtype))
        return (net is self.net and rows == self.rows and same_text and self.caches[0].k.dtype == dtype
                and fused == self.fused
                # buffers made under inference_mode (Trainer.predict) cannot be written outside it, nor the reverse
                and self.caches[0].k.is_inference() == torch.is_inference_mode_enabled()
                and weights_fingerprint(net) == self.fingerprint)

    def _step(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        for cache in self.caches:
            cache.length = self.starts[k]
        hidden = self.net.forward_scale(self.inputs[k], k, self.caches, self.text_kvs, self.text_bias,
                                        fused=self.fused)
        return hidden, self.net.logits(hidden)  # (rows, l, C), (rows, l, V)

    def _capture(self, k: int) -> None:
        warm_up(lambda: self._step(k), self.device)
        self.graphs[k], self.outputs[k] = capture(lambda: self._step(k), self.pool)

    def run(self, k: int, x: torch.Tensor, text_kvs: Optional[List[tuple]] = None,
            text_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scale ``k``'s hidden states and logits for input tokens ``x`` ``(rows, pn*pn, C)``; at scale 0
        the call's text keys/values and bias are copied in. The outputs are overwritten by the next
        call of the same scale: read them before."""
        if k == 0 and self.text_kvs is not None:
            for (k_static, v_static), (k_new, v_new) in zip(self.text_kvs, text_kvs):
                k_static.copy_(k_new)
                v_static.copy_(v_new)
            self.text_bias.copy_(text_bias)
        if self.inputs[k] is None:  # allocated at the first call, in the dtype the loop produces
            self.inputs[k] = torch.empty_like(x)
        self.inputs[k].copy_(x)
        if self.device.type != "cuda":
            return self._step(k)
        if self.graphs[k] is None:
            self._capture(k)
        self.graphs[k].replay()
        for cache in self.caches:  # what the replayed step appended
            cache.length = self.starts[k] + x.shape[1]
        return self.outputs[k]
