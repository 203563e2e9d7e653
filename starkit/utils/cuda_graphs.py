"""Capturing CUDA graphs of inference steps: a warm-up outside the graph, then the capture into a shared pool
(the generator's scale steps, :mod:`starkit.generator.graphs`, the sampler head's reveal steps,
:mod:`starkit.samplers.head_graphs`, and whole generations, :mod:`starkit.generator.whole_graph`)."""
from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import torch


def captures_on(device: torch.device) -> bool:
    """Whether work on ``device`` is captured into CUDA graphs (CUDA) or runs eagerly on the same static buffers
    (elsewhere; what the CPU tests check)."""
    return device.type == "cuda"


def warm_up(fn: Callable[[], Any], device: torch.device) -> Any:
    """``fn()`` on a side stream, ordered after and before the current stream's work: compilation, lazy
    initialisation, the allocator's first blocks and cached weight casts happen here, not in a capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return out


def capture(fn: Callable[[], Any], pool,
            generators: Sequence[torch.Generator] = ()) -> Tuple["torch.cuda.CUDAGraph", Any]:
    """A CUDA graph of ``fn()`` in the memory pool ``pool`` (graphs replayed one at a time may share one) and
    the output tensors of the captured call, which each replay overwrites. ``generators``: CUDA generators
    that ``fn`` draws from besides the default one; registered with the graph, a replay draws from their
    state at that time (seed them before a replay as before an eager call)."""
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
