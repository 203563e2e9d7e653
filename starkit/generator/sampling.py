"""The scale-by-scale sampling loop: KV cache, text keys/values once, batched guidance."""
from __future__ import annotations

import contextlib
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

from starkit.generator.blocks import key_padding_bias
from starkit.generator.transformer import ScaleTransformer
from starkit.samplers import ScaleSampler, ScaleStep
from starkit.text import TextEmbedding, TextEncoder
from starkit.tokenizers import ScaleTokenizer


def autocast_for(device: torch.device, cache_enabled: bool = True):
    """bf16 autocast on CUDA (``cache_enabled=False`` when CUDA graphs are captured); float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


def encode_with_guidance(text_encoder: TextEncoder, prompts: Sequence[str], guided: bool, device,
                         cuda_graphs: bool = False) -> TextEmbedding:
    """Conditional rows first, then (when guided) the empty prompt once per row. ``cuda_graphs``: the encoder
    may replay its model from a CUDA graph (:meth:`TextEncoder.encode`)."""
    # the keyword only when asked: a text encoder of one's own may override encode(prompts) without it
    text = text_encoder.encode(list(prompts), cuda_graphs=True) if cuda_graphs else text_encoder.encode(list(prompts))
    if guided:
        empty = text_encoder.empty()
        n = len(prompts)
        empty = TextEmbedding(empty.tokens.expand(n, -1, -1), empty.mask.expand(n, -1), empty.pooled.expand(n, -1))
        text = TextEmbedding.cat([text, empty])
    return text.to(device)


def check_cuda_graphs(value) -> None:
    """The ``cuda_graphs`` setting of generation (``generate``, ``PretrainedGenerator``): False, True (per-scale
    steps, also "steps") or "whole"; anything else is one error naming the choices."""
    if value not in (True, False, "steps", "whole"):
        raise ValueError(f"cuda_graphs must be false, true (per-scale steps, also 'steps') or 'whole' (False/True "
                         f"in Python), got {value!r}.")


def is_single_seed(seed) -> bool:
    """Whether ``seed`` is one integer (a Python or NumPy int, or a 0-d tensor), not one seed per image."""
    return isinstance(seed, numbers.Integral) or (torch.is_tensor(seed) and seed.dim() == 0)


def check_count(name: str, value) -> None:
    """One clear error unless ``value`` is an int >= 1 (``num_images_per_prompt``, ``batch_size``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")


def check_seed(seed):
    """``seed`` as given when None or one integer, else as a list (one seed per prompt); one clear error for
    anything else (a string would otherwise be read as one seed per character, a float fail on iteration)."""
    if seed is None or is_single_seed(seed):
        return seed
    if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__"):
        raise TypeError(f"seed must be None, an int, or a list with one int per prompt, got {type(seed).__name__} "
                        f"{seed!r}.")
    seed = list(seed)
    bad = [s for s in seed if not is_single_seed(s)]
    if bad:
        raise TypeError(f"seed must be None, an int, or a list with one int per prompt; the list holds "
                        f"{type(bad[0]).__name__} {bad[0]!r}.")
    return seed


def random_source(seed, num_images: int, device):
    """None, a ``torch.Generator`` (one seed for the call), or :class:`RowGenerators` (one seed per image)."""
    if seed is None:
        return None
    if is_single_seed(seed):
        return torch.Generator(device).manual_seed(int(seed))
    from starkit.samplers.functional import RowGenerators
    seeds = [int(s) for s in seed]
    if len(seeds) != num_images:
        raise ValueError(f"got {len(seeds)} seeds for {num_images} images: give one int for the call or one "
                         f"per image.")
    return RowGenerators(seeds, device)


@torch.no_grad()
def run_sampling(net: ScaleTransformer, tokenizer: ScaleTokenizer, text_encoder: TextEncoder, sampler: ScaleSampler,
                 prompts: Sequence[str], seed: Union[None, int, Sequence[int]], device, static_steps: Optional[dict] = None,
                 fused: bool = False, whole_graph: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Generate one image per prompt. Returns images ``(B, 3, H, W)`` in [0, 1] and the K index maps.

    ``static_steps``: a dict kept by the caller between calls; given, the scale steps run on static
    buffers (:class:`~starkit.generator.graphs.StaticScaleSteps`), replayed from CUDA graphs on the GPU.
    ``whole_graph`` (with ``static_steps``): instead, everything after the text encoding (all scales, the
    sampling, the VQ decode) is one CUDA graph (:class:`~starkit.generator.whole_graph.WholeGenerationGraph`).
    ``fused``: the blocks' element-wise work in compiled regions (:mod:`starkit.generator.fused`).
    ``seed``: None, one int for the call's random stream, or one int per prompt (each image's draws from
    its own stream, :class:`~starkit.samplers.functional.RowGenerators`)."""
    device = torch.device(device)
    if tuple(tokenizer.patch_nums) != tuple(net.patch_nums):
        raise ValueError(f"tokenizer patch_nums {tokenizer.patch_nums} differ from the generator's {net.patch_nums}.")
    B = len(prompts)
    guided = float(getattr(sampler, "cfg", 0.0) or 0.0) > 0
    text = encode_with_guidance(text_encoder, prompts, guided, device, cuda_graphs=static_steps is not None)
    if whole_graph and static_steps is not None:
        from starkit.generator.whole_graph import WholeGenerationGraph
        return WholeGenerationGraph.run(static_steps, net, tokenizer, sampler, text, B, guided, seed, device, fused)
    if static_steps is not None:
        static_steps.pop("whole", None)  # the per-step graphs' buffers replace a whole-generation graph's
    return sample_scales(net, tokenizer, sampler, text, B, guided, random_source(seed, B, device), device,
                         static_steps, fused)


def sample_scales(net: ScaleTransformer, tokenizer: ScaleTokenizer, sampler: ScaleSampler, text: TextEmbedding,
                  B: int, guided: bool, generator, device: torch.device, static_steps: Optional[dict] = None,
                  fused: bool = False, in_graph: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The scale loop and the VQ decode for encoded prompts ``text`` (``B`` rows, twice that when
    ``guided``): images ``(B, 3, H, W)`` in [0, 1] and the K index maps. ``in_graph``: the call is being
    captured whole into a CUDA graph (autocast's weight cache off, no per-step graphs)."""
    rows = text.pooled.shape[0]
    with autocast_for(device, cache_enabled=static_steps is None and not in_graph):
        cache_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        text_kvs = net.text_kv(text.tokens) if net.blocks[0].cross_attn is not None else None
        # cast once to the attention dtype (the cross-attention would cast it at every layer and scale)
        text_bias = key_padding_bias(text.mask).to(text_kvs[0][1].dtype) if text_kvs is not None else None
        steps = None
        if static_steps is not None:
            from starkit.generator.graphs import StaticScaleSteps
            steps = static_steps.get("steps")
            if steps is None or not steps.matches(net, rows, text_kvs, cache_dtype, fused):
                note = static_steps.get("whole_failed")  # a failed whole-generation capture is not tried again
                static_steps.clear()  # frees the old graphs and buffers first
                if note:
                    static_steps["whole_failed"] = note
                steps = static_steps["steps"] = StaticScaleSteps(net, rows, text_kvs, text_bias, cache_dtype, fused)
        caches = net.new_caches(rows, device, cache_dtype) if steps is None else None
        x = net.start_tokens(text.pooled)  # (rows, first_l, C)
        f_hat = tokenizer.empty_latent(B, device=device)
        all_indices = []
        rotary_first = net.positional.rotary(slice(0, 1))  # the start position's tables, the same at every scale
        start, K = 0, len(net.patch_nums)
        for k, pn in enumerate(net.patch_nums):
            if steps is None:
                hidden = net.forward_scale(x, k, caches, text_kvs, text_bias, fused=fused)  # (rows, pn*pn, C)
                logits = net.logits(hidden)  # (rows, pn*pn, V)
            else:
                hidden, logits = steps.run(k, x, text_kvs, text_bias)
            step = ScaleStep(
                scale=k, num_scales=K, patch_num=pn, hidden=hidden, logits=logits, guided=guided,
                embed=tokenizer.embed, codebook=tokenizer.codebook, pooled_text=text.pooled,
                rotary=net.positional.rotary(slice(start, start + pn * pn)),
                rotary_first=rotary_first, generator=generator, compile_blocks=fused,
                graph_store=static_steps, max_patch_num=net.patch_nums[-1],
            )
            emb_BlC, idx_Bl = sampler.sample_scale(step)
            all_indices.append(idx_Bl)
            f_hat = tokenizer.add_scale(f_hat, k, emb_BlC.float())
            start += pn * pn
            if k + 1 < K:
                x = net.scale_tokens(tokenizer.next_scale_input(f_hat, k + 1), k + 1)
                if guided:
                    x = torch.cat([x, x], dim=0)
        images = decode_in_chunks(tokenizer, f_hat)
    return images.float().add(1).mul(0.5).clamp(0, 1), all_indices


DECODE_LATENT_AREA = 4 * 64 * 64  # latent positions decoded at once: four 1024 px images of VAR's f16 tokenizer


def decode_in_chunks(tokenizer: ScaleTokenizer, f_hat: torch.Tensor) -> torch.Tensor:
    """``tokenizer.decode_latent`` over chunks of at most ``DECODE_LATENT_AREA`` latent positions: the
    decoder's activations at 1024 px take about 0.6 GiB per image and layer, so decoding a large batch
    at once can run out of memory beside the KV caches; a chunk of four 1024 px images keeps the GPU
    busy already. ``f_hat`` ``(B, Cvae, h, w)`` -> images ``(B, 3, H, W)``."""
    per_chunk = max(1, DECODE_LATENT_AREA // (f_hat.shape[-1] * f_hat.shape[-2]))
    if f_hat.shape[0] <= per_chunk:
        return tokenizer.decode_latent(f_hat)
    return torch.cat([tokenizer.decode_latent(part) for part in f_hat.split(per_chunk)])
