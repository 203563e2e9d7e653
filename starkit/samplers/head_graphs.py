"""The sampler head's reveal steps replayed from CUDA graphs.

At batch 1 a reveal step of the stable sampler's head is three transformer blocks over a few hundred to a
few thousand tokens: a millisecond or two of GPU work, launched from Python as some sixty kernels and
compiled-graph calls, which takes the host about as long. On the middle scales the GPU then waits for the
host. ``generate(..., cuda_graphs=True)`` captures each reveal step's blocks, norm and logits once per
shape (scale, batch, number of hidden rows: the reveal schedule is fixed, so a generation of a given batch
size replays the same graphs every call) and replays them.

A graph replays fixed addresses: per scale and batch the head's fixed input (``base``, the rotary tables),
the revealed embeddings and the logits live in static buffers, and each step's positions in its own; the
graphs share one memory pool for what they use inside. The logits are written into the scale's buffer,
overwritten by the next step: the sampler reads them before. Everything is rebuilt when the head's weights
change (an optimizer step, a load). On the CPU the same buffers are used with eager calls (what the tests
check); the capture runs only on CUDA.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from starkit.utils.cuda_graphs import capture, warm_up
from starkit.utils.inference_cache import weights_fingerprint


class _ScaleBuffers:
    """Static inputs and output of one (rows, tokens) shape, and its steps' graphs keyed by position shape."""

    def __init__(self, base: torch.Tensor, rotary: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.base = torch.empty_like(base)  # (R, 1 + l, C)
        self.rotary = tuple(torch.empty_like(t) for t in rotary) if rotary is not None else None
        self.revealed: Optional[torch.Tensor] = None  # (R', l, Cvae), at the first step
        self.logits: Optional[torch.Tensor] = None  # flat, room for (R, l, V)
        self.steps: Dict[tuple, tuple] = {}  # positions shape (or None) -> (graph or None, positions, logits view)


class HeadStepGraphs:
    """CUDA graphs of a :class:`~starkit.samplers.head.SamplerHead`'s reveal steps (see the module docstring).
    Kept by the generator with its scale steps (``generate(cuda_graphs=True)``; ``release_cuda_graphs()``
    frees them)."""

    def __init__(self) -> None:
        self.head: Optional[torch.nn.Module] = None
        self.fingerprint: Optional[tuple] = None
        self.shapes: Dict[tuple, _ScaleBuffers] = {}
        self.pool = None

    def _valid_for(self, head: torch.nn.Module) -> None:
        fingerprint = weights_fingerprint(head)
        if head is not self.head or fingerprint != self.fingerprint:  # another head or new weights: start over
            self.shapes.clear()
            self.head, self.fingerprint = head, fingerprint

    def predictor(self, head: torch.nn.Module, base: torch.Tensor, rotary, body: Callable,
                  form: tuple = ()) -> Callable:
        """``predict(revealed, positions=None)`` replaying ``body(base, rotary, revealed, positions)`` ->
        logits ``(R, h, V)`` from graphs: ``base`` ``(R, 1 + l, C)`` and ``rotary`` are the scale's fixed
        inputs (copied into the static buffers here). The returned logits are overwritten by the next step.
        ``form``: what else selects the code ``body`` runs (compiled or not, ...): a graph replays the body
        it was captured from, so another form gets graphs of its own."""
        self._valid_for(head)
        key = (tuple(base.shape), base.dtype, base.device, torch.is_autocast_enabled(base.device.type),
               None if rotary is None else tuple(rotary[0].shape), tuple(form))
        buffers = self.shapes.get(key)
        if buffers is None:
            buffers = self.shapes[key] = _ScaleBuffers(base, rotary)
        buffers.base.copy_(base)
        for static, table in zip(buffers.rotary or (), rotary or ()):
            static.copy_(table)

        def predict(revealed: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
            if buffers.revealed is None or buffers.revealed.shape != revealed.shape:
                buffers.revealed, buffers.steps = torch.empty_like(revealed), {}
            buffers.revealed.copy_(revealed)
            key = None if positions is None else tuple(positions.shape)
            step = buffers.steps.get(key)
            if step is None:
                step = buffers.steps[key] = self._capture(buffers, body, positions)
            graph, static_positions, logits = step
            if static_positions is not None:
                static_positions.copy_(positions)
            if graph is None:  # off CUDA: the same buffers, an eager call
                return logits.copy_(body(buffers.base, buffers.rotary, buffers.revealed, static_positions))
            graph.replay()
            return logits
        return predict

    def _capture(self, buffers: _ScaleBuffers, body: Callable, positions: Optional[torch.Tensor]) -> tuple:
        static_positions = None if positions is None else positions.clone()
        device = buffers.base.device

        def run() -> torch.Tensor:
            return body(buffers.base, buffers.rotary, buffers.revealed, static_positions)

        if device.type != "cuda":
            out = run()
            return None, static_positions, self._logits_view(buffers, out)
        logits = self._logits_view(buffers, warm_up(run, device))
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, _ = capture(lambda: logits.copy_(run()), self.pool)
        return graph, static_positions, logits

    @staticmethod
    def _logits_view(buffers: _ScaleBuffers, out: torch.Tensor) -> torch.Tensor:
        """A contiguous ``out``-shaped view of the scale's logits buffer (room for all its tokens' logits)."""
        R, l, V = buffers.base.shape[0], buffers.base.shape[1] - 1, out.shape[-1]
        if buffers.logits is None or buffers.logits.dtype != out.dtype or buffers.logits.numel() < R * l * V:
            buffers.logits = out.new_empty(R * l * V)
        return buffers.logits[:out.numel()].view(out.shape)
