"""Generation with a :class:`~starkit.generator.module.ScaleWiseGenerator`: ``generate()`` (KV cache, batched
classifier-free guidance, CUDA graphs, compiled regions, FP8 products), the graphs' release and Lightning's
``predict_step`` (``starkit predict``). A mixin of the generator, kept apart from its training code; the
sampling loop itself is :mod:`starkit.generator.sampling`.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Sequence, Union

import torch

from starkit.samplers import ScaleSampler


@contextlib.contextmanager
def in_eval_mode(*modules: torch.nn.Module):
    """The modules in eval mode within the block, each put back in its own mode after. A generator fresh from
    ``load_from_checkpoint`` is in training mode, where stochastic depth drops blocks at random: generation
    must not depend on the module's mode (the same seed, the same images)."""
    training = [sub for m in modules if m is not None for sub in m.modules() if sub.training]
    for sub in training:
        sub.training = False
    try:
        yield
    finally:
        for sub in training:
            sub.training = True


class GenerationMixin:
    """``generate``, ``release_cuda_graphs`` and ``predict_step`` of :class:`ScaleWiseGenerator` (which provides
    ``transformer``, ``ema``, ``tokenizer``, ``text_encoder``, ``sampler`` and ``device``)."""

    @torch.no_grad()
    def generate(self, prompts: Union[str, Sequence[str]], cfg: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, temperature: Optional[float] = None,
                 seed: Union[None, int, Sequence[int]] = None,
                 num_images_per_prompt: int = 1, sampler: Optional[ScaleSampler] = None,
                 use_ema: bool = True, return_indices: bool = False, cuda_graphs: Union[bool, str] = False,
                 compile_blocks: bool = False, fp8: bool = False):
        """Generate images for prompts with a KV cache and batched classifier-free guidance.

        Args:
            prompts: one prompt or a list (the empty string "" is allowed).
            cfg, top_k, top_p, temperature: override the sampler's settings for this call.
            seed: one int: the seed of the call's torch.Generator (same seed and prompts, same images);
                a list: one seed per prompt (with ``num_images_per_prompt`` K, image j of prompt i gets
                ``seed[i] + j``), each image drawn from its own stream, so it does not depend on the
                other images of the batch (``starkit predict`` does this); None: not seeded.
            num_images_per_prompt: images per prompt (consecutive in the output).
            sampler: another sampler for this call (default: the generator's).
            use_ema: sample with the EMA transformer when there is one.
            return_indices: also return the K token maps.
            cuda_graphs: run the per-scale transformer steps on static buffers kept between calls and
                replay them from CUDA graphs (one capture per batch shape; rebuilt when the weights
                change). On an H200, with the compiled VQ decoder, batch-1 generation took 0.041 s
                at d16 @256 (7.7x the eager loop in the same run) and 0.34 s at d30 @1024 (2.1x);
                docs/performance.md. The stable sampler's head steps and the text encoder's model
                (:meth:`~starkit.text.TextEncoder.encode`) are replayed from graphs too
                (:mod:`starkit.samplers.head_graphs`). The static buffers (KV caches included) stay
                allocated between calls (:meth:`release_cuda_graphs` frees them).
                ``"whole"``: everything after the text encoding (all scales, the sampler, the VQ decode) as one
                CUDA graph per batch shape, sampler settings and weights (:mod:`starkit.generator.whole_graph`;
                the same seed gives the same images as the per-step graphs); for small models at batch 1,
                where launching the sampler's and tokenizer's kernels from Python is most of the time. One
                graph is kept: alternating batch shapes capture again at each change.
            compile_blocks: run each block's element-wise work (LayerNorms, QK-norm, rotary, GELU,
                residuals) as ``torch.compile``'d regions between the matrix products and attentions
                (:mod:`starkit.generator.fused`; the first call compiles), in the transformer and in
                the stable sampler's head. Combines with ``cuda_graphs``. On an H200 with CUDA graphs,
                d30 @1024 stable: 7.6% faster at batch 1, 11.2% at batch 16; d16 @256 stable batch 1:
                slower (the head's small steps pay the regions' per-call cost); docs/performance.md.
            fp8: the linear layers of the transformer's and the sampler head's blocks multiply in float8 e4m3
                with row-wise scales (:mod:`starkit.generator.fp8`; GPUs of compute capability 8.9 or later).
                An approximation: each product is ~4% off bf16's, so the images differ from bf16's of the same
                seed. Faster only with ``compile_blocks`` (and ``StableSampler(compile_head=True)``), where the
                quantization is fused; docs/performance.md has the figures.

        Returns:
            images ``(N, 3, H, W)`` float in [0, 1] (and the list of indices if asked).
        """
        from starkit.generator.sampling import check_count, check_cuda_graphs, check_seed, is_single_seed, run_sampling
        if isinstance(prompts, str):
            prompts = [prompts]
        check_count("num_images_per_prompt", num_images_per_prompt)
        seed = check_seed(seed)
        if self.device.type != "cuda":
            dtype = next(self.transformer.parameters()).dtype
            if dtype != torch.float32:
                raise TypeError(f"generate() runs in float32 on {self.device.type} (bf16 autocast only on CUDA), but "
                                f"the generator's weights are {dtype}: call .float() on it (or move it to a GPU).")
        if seed is not None and not is_single_seed(seed):
            seeds = [int(s) for s in seed]
            if len(seeds) != len(prompts):
                raise ValueError(f"generate() got {len(seeds)} seeds for {len(prompts)} prompts: give one int, or one "
                                 f"seed per prompt.")
            seed = [s + j for s in seeds for j in range(num_images_per_prompt)]
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        sampler = (sampler or self.sampler).with_settings(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
        net = self.ema if (use_ema and self.ema is not None) else self.transformer
        check_cuda_graphs(cuda_graphs)
        from starkit.generator.fp8 import check_supported, fp8_layers
        if fp8:
            check_supported(self.device)
            if not compile_blocks and not self.__dict__.get("_warned_fp8_eager"):
                self.__dict__["_warned_fp8_eager"] = True
                warnings.warn("generate(fp8=True) without compile_blocks=True quantizes the products' inputs in passes of "
                              "their own: on an H200 each product is then 0.38-0.97x bf16's speed (docs/performance.md). "
                              "Pass compile_blocks=True (and StableSampler(compile_head=True)).", UserWarning, stacklevel=2)
        if cuda_graphs:  # graphs replay the products they were captured with: new ones when the precision changes
            if self.__dict__.get("_graphs_fp8", bool(fp8)) != bool(fp8):
                self.release_cuda_graphs()
            self.__dict__["_graphs_fp8"] = bool(fp8)
        static = self.__dict__.setdefault("_static_steps", {}) if cuda_graphs else None
        with fp8_layers([net, sampler], enabled=fp8), in_eval_mode(net, sampler):
            images, indices = run_sampling(net, self.tokenizer, self.text_encoder, sampler, prompts, seed,
                                           self.device, static_steps=static, fused=compile_blocks,
                                           whole_graph=cuda_graphs == "whole")
        return (images, indices) if return_indices else images

    def release_cuda_graphs(self) -> None:
        """Free what ``generate(..., cuda_graphs=True)`` keeps between calls: the CUDA graphs and their
        static buffers, KV caches included (about 70 GiB for d30 @1024 at batch 16 with guidance), the
        stable sampler head's step graphs and buffers (:mod:`starkit.samplers.head_graphs`), and the graph of
        ``cuda_graphs="whole"`` (:mod:`starkit.generator.whole_graph`), and the text encoder's graphs. The
        memory goes back to PyTorch's caching allocator; ``torch.cuda.empty_cache()`` returns it to the GPU."""
        self.__dict__.pop("_static_steps", None)
        self.text_encoder.release_cuda_graphs()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        prompts, seeds = list(batch["prompt"]), [int(s) for s in batch["seed"]]
        # generate() options for prediction, e.g. {"cuda_graphs": True} (PretrainedGenerator sets them from YAML)
        options = dict(getattr(self, "predict_options", {}))
        if options.get("cuda_graphs") and self.transformer.adaln:  # VAR (AdaLN) models have no graph path yet
            if not self.__dict__.get("_warned_adaln_graphs"):
                self.__dict__["_warned_adaln_graphs"] = True
                warnings.warn("cuda_graphs is not supported for AdaLN (VAR) transformers yet: predicting without "
                              "CUDA graphs.", UserWarning, stacklevel=2)
            options["cuda_graphs"] = False
        images = self.generate(prompts, seed=seeds, **options)  # each image from its own seed
        return {"images": images.mul(255).round().clamp(0, 255).to(torch.uint8).cpu(), "prompt": prompts,
                "seed": seeds, "name": list(batch.get("name", [])),
                "settings": self.sampler.hparams and dict(self.sampler.hparams)}
