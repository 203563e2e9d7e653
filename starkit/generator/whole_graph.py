"""A whole generation after the text encoding (every scale's transformer step, the sampler, the
tokenizer's latent updates and the VQ decode) replayed as one CUDA graph.

``generate(..., cuda_graphs="whole")``. The per-scale graphs of :mod:`starkit.generator.graphs`
leave the sampling and the tokenizer's work between the scale steps to Python, which launches
hundreds of small kernels per generation: at batch 1 of a small model (d16 @256) the host's
launch time is most of the latency, and it moves with the host's speed from run to run. One
graph of the whole loop launches all of it at once.

What a replay reads is in static buffers: the encoded prompts (copied in at each call) and the
random generators, which the graph registers (``CUDAGraph.register_generator_state``) and each
call re-seeds, so a seed gives the same draws as the loop without the graph. What the capture
baked in is the key of the graph: the transformer, tokenizer and sampler objects and their
weights' versions (an optimizer step or a load re-captures), the sampler's settings, the batch
shape, guidance, the kind of seed (none, one, one per image), ``compile_blocks``, and inference
mode. A call with another key captures again, replacing the old graph (one graph is kept: calls that
alternate batch sizes, e.g. a last smaller batch, capture each time; give fixed batch shapes, or use
``cuda_graphs=True`` there). The first call of a key runs the loop once to warm up (compilation,
cached weight casts), captures, then replays.

Off CUDA the same static buffers and re-seeded generators serve an eager run of the loop (what
the CPU tests check; a CPU stand-in for the capture checks that outputs are copied and settings
re-keyed). If the capture itself fails (an operation that cannot be captured, e.g. a host
synchronisation in a custom sampler), the call warns once, names the cause and continues with the
per-scale graphs; other errors (out of memory, a bug in the warm-up run) propagate. The warm-up's
buffers are returned to the GPU before the capture allocates its own (no double peak); the graph's
memory pool then keeps the whole generation's buffers until the next capture or ``release_cuda_graphs()``.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from starkit.samplers import ScaleSampler
from starkit.samplers.functional import RowGenerators
from starkit.text import TextEmbedding
from starkit.utils import cuda_graphs
from starkit.utils.inference_cache import weights_fingerprint


def _setting_key(value: Any) -> Any:
    """A comparable stand-in for one setting: numbers by value (NumPy and 0-d tensor ones too), sequences and
    dicts item by item, tensors by storage, version and (small CPU ones) values, anything else by identity."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Number):
        return (type(value).__name__, value.item() if hasattr(value, "item") else value)
    if isinstance(value, torch.Tensor):
        values = tuple(value.flatten().tolist()) if value.device.type == "cpu" and value.numel() <= 64 else None
        return ("tensor", value.data_ptr(), value._version, tuple(value.shape), value.dtype, values)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(_setting_key(v) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple(sorted((str(k), _setting_key(v)) for k, v in value.items()))
    return ("id", id(value))


def sampler_settings(sampler: ScaleSampler) -> tuple:
    """What a capture bakes in of the sampler besides its weights: its public attributes (the settings, of any
    type: numbers, NumPy or tensor scalars, sequences, callables by identity) and its private plain ones (flags,
    numbers, strings); sub-modules are covered by the weights' fingerprint."""
    plain = (bool, int, float, str, type(None))
    items = []
    for name, value in vars(sampler).items():
        if isinstance(value, torch.nn.Module):
            continue
        if not name.startswith("_"):
            items.append((name, _setting_key(value)))
        elif isinstance(value, plain):
            items.append((name, value))
    return (type(sampler),) + tuple(sorted(items, key=lambda item: item[0]))


class CaptureFailed(RuntimeError):
    """The capture of a whole generation failed (an operation that cannot be captured); ``__cause__`` says why."""


def seed_kind(seed) -> str:
    """"none", "one" (one int for the call) or "rows" (one per image): each needs other generators in the graph."""
    from starkit.generator.sampling import is_single_seed
    return "none" if seed is None else "one" if is_single_seed(seed) else "rows"


class WholeGenerationGraph:
    """One captured generation of a fixed key (see the module docstring), kept in the generator's
    ``_static_steps`` dict under ``"whole"`` between calls (``release_cuda_graphs()`` frees it).

    Args:
        parts: ``(net, tokenizer, sampler)`` of the capture (compared by identity).
        key: the rest of what the capture depends on (compared by value).
        text: the encoded prompts (copied into the graph's static input).
        batch: images B.
        guided: whether the rows hold the unconditional half too.
        seed: the call's seed (None, one int, or one per image): decides the kind of random source.
        device: where the graph runs.
        fused: the blocks' element-wise work in compiled regions.
    """

    def __init__(self, parts: tuple, key: tuple, text: TextEmbedding, batch: int, guided: bool, seed,
                 device: torch.device, fused: bool) -> None:
        self.parts, self.key = parts, key  # (net, tokenizer, sampler) compared by identity, the rest by value
        self.batch, self.guided, self.device, self.fused = batch, guided, device, fused
        self.text = TextEmbedding(text.tokens.clone(), text.mask.clone(), text.pooled.clone())
        kind = seed_kind(seed)
        self.generator: Union[None, torch.Generator, RowGenerators] = (
            None if kind == "none" else torch.Generator(device) if kind == "one"
            else RowGenerators([0] * batch, device))
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.outputs: Optional[Tuple[torch.Tensor, List[torch.Tensor]]] = None
        self.captures = 0  # how many times this key was captured (1 after the first call on CUDA)

    # ------------------------------------------------------------------ entry point
    @classmethod
    def run(cls, store: dict, net, tokenizer, sampler: ScaleSampler, text: TextEmbedding, batch: int, guided: bool,
            seed, device: torch.device, fused: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Images ``(B, 3, H, W)`` in [0, 1] and the K index maps of one generation, from the graph kept in
        ``store`` when its key matches, else from a new capture (which replaces it)."""
        from starkit.generator.sampling import random_source, sample_scales

        def per_scale_graphs():
            return sample_scales(net, tokenizer, sampler, text, batch, guided, random_source(seed, batch, device),
                                 device, store, fused)

        if store.get("whole_failed"):  # a capture failed before
            return per_scale_graphs()
        parts = (net, tokenizer, sampler)
        key = cls.key_of(net, tokenizer, sampler, text, batch, guided, seed, fused)
        whole = store.get("whole")
        if whole is None or whole.key != key or any(a is not b for a, b in zip(whole.parts[:2], parts[:2])):
            store.clear()  # the per-step graphs' and an older capture's buffers go first
            whole = store["whole"] = cls(parts, key, text, batch, guided, seed, device, fused)
        try:
            return whole(text, seed)
        except CaptureFailed as failed:  # reported, then the per-scale graphs (other errors propagate)
            err = failed.__cause__
            torch.cuda.synchronize(device)
            store.clear()
            store["whole_failed"] = f"{type(err).__name__}: {err}"
            warnings.warn(f"cuda_graphs='whole': the generation could not be captured as one CUDA graph "
                          f"({store['whole_failed'][:300]}); continuing with the per-scale graphs "
                          f"(cuda_graphs=True). release_cuda_graphs() lets a later call try again.",
                          RuntimeWarning, stacklevel=4)
            return per_scale_graphs()

    @staticmethod
    def key_of(net, tokenizer, sampler: ScaleSampler, text: TextEmbedding, batch: int, guided: bool, seed,
               fused: bool) -> tuple:
        """Everything a capture bakes in besides the objects themselves (see the module docstring)."""
        return (weights_fingerprint(net), weights_fingerprint(tokenizer), weights_fingerprint(sampler),
                sampler_settings(sampler), tuple(text.tokens.shape), text.tokens.dtype, tuple(text.pooled.shape),
                batch, guided, seed_kind(seed), fused, torch.is_inference_mode_enabled())

    # ------------------------------------------------------------------ one call
    def __call__(self, text: TextEmbedding, seed) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        self._set_inputs(text, seed)
        if not cuda_graphs.captures_on(self.device):
            return self._loop()
        if self.graph is None:
            # compiles, casts and allocates outside the capture. It draws too: the call's generators are seeded
            # again, and the default generator (seed None) is put back where the call found it.
            default_state = torch.cuda.get_rng_state(self.device) if self.generator is None else None
            cuda_graphs.warm_up(self._loop, self.device)
            if default_state is not None:
                torch.cuda.set_rng_state(default_state, self.device)
            self._set_inputs(text, seed)
            # the warm-up's buffers (KV caches, ...) go back to the GPU: the capture allocates its own in a private
            # pool, and both at once could double the peak (~70 GiB of KV cache at d30 @1024, batch 16)
            torch.cuda.empty_cache()
            try:
                self.graph, self.outputs = cuda_graphs.capture(self._loop, torch.cuda.graph_pool_handle(),
                                                               self._generators())
            except Exception as err:  # noqa: BLE001
                raise CaptureFailed(str(err)) from err
            self.captures += 1
            self._set_inputs(text, seed)
        self.graph.replay()
        images, indices = self.outputs
        return images.clone(), [idx.clone() for idx in indices]  # the next replay overwrites the outputs

    def _loop(self) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        from starkit.generator.sampling import sample_scales
        net, tokenizer, sampler = self.parts
        return sample_scales(net, tokenizer, sampler, self.text, self.batch, self.guided, self.generator,
                             self.device, None, self.fused, in_graph=True)

    def _set_inputs(self, text: TextEmbedding, seed) -> None:
        self.text.tokens.copy_(text.tokens)
        self.text.mask.copy_(text.mask)
        self.text.pooled.copy_(text.pooled)
        if isinstance(self.generator, torch.Generator):
            self.generator.manual_seed(int(seed))
        elif isinstance(self.generator, RowGenerators):
            seeds: Sequence[int] = [int(s) for s in seed]
            if len(seeds) != len(self.generator):
                raise ValueError(f"got {len(seeds)} seeds for {len(self.generator)} images.")
            for generator, s in zip(self.generator.generators, seeds):
                generator.manual_seed(s)

    def _generators(self) -> List[torch.Generator]:
        if isinstance(self.generator, torch.Generator):
            return [self.generator]
        if isinstance(self.generator, RowGenerators):
            return list(self.generator.generators)
        return []  # the default generator: PyTorch registers it with every capture
