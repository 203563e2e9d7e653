"""``StarPipeline``: a self-contained model directory in, PIL images out.

Model directory layout (written by :meth:`StarPipeline.save_pretrained` / ``starkit export``)::

    starkit.json            format, generator settings, component configs (class_path/init_args)
    generator.safetensors   transformer weights (EMA weights when the run kept an EMA) + sampler head
    tokenizer/              config.json + model.safetensors (MultiScaleVQ.save_pretrained)
    text_encoder/           optional copy of a Hugging Face encoder (else a reference by name/path)
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Union

import torch
from PIL import Image

from starkit.generator import ScaleWiseGenerator
from starkit.generator.hparams import component_config
from starkit.samplers import ScaleSampler
from starkit.text import TextEncoder
from starkit.utils.class_path import build_from_config, import_class
from starkit.utils.io import atomic_save_safetensors, atomic_write_bytes, images_to_pil

FORMAT = "starkit-model"
FORMAT_VERSION = 1
COMPONENT_ARGS = ("tokenizer", "text_encoder", "positional", "sampler")
NOT_EXPORTED = ("init_from", "_instantiator", "_class_path")


def _positional_factory(config: Optional[dict]):
    if not config:
        return None
    import functools

    from starkit.positional import PositionalEncoding
    cls = import_class(config["class_path"], PositionalEncoding, "starkit.json: positional")
    return functools.partial(cls, **(config.get("init_args") or {}))


def text_encoder_from_config(config: dict, model_dir: str) -> TextEncoder:
    """The text encoder that a model directory's ``starkit.json`` names (``${MODEL_DIR}`` in its arguments: the
    directory, where a copied text encoder lives)."""
    text_cfg = json.loads(json.dumps(config["text_encoder"]).replace("${MODEL_DIR}", os.path.abspath(model_dir)))
    return build_from_config(text_cfg, TextEncoder, "starkit.json: text_encoder")


def sampler_from_config(config: dict) -> Optional[ScaleSampler]:
    """The sampler that a model directory's ``starkit.json`` names, or None without one."""
    if not config.get("sampler"):
        return None
    return build_from_config(config["sampler"], ScaleSampler, "starkit.json: sampler")


def read_model_config(path: str) -> dict:
    """Read and check ``starkit.json`` of a model directory (one clear error if it is not one)."""
    cfg_path = os.path.join(path, "starkit.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"{path!r} is not a starkit model directory (no starkit.json). Export a checkpoint with "
            f"`starkit export CKPT OUT_DIR`, or convert official weights with `starkit convert`."
        )
    with open(cfg_path) as fh:
        config = json.load(fh)
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} has format {config.get('format')!r}, expected {FORMAT!r}.")
    return config


def load_generator(path: str, device: Union[str, torch.device] = "cpu", sampler: Optional[dict] = None) -> ScaleWiseGenerator:
    """Build a :class:`ScaleWiseGenerator` from a model directory and load its weights.

    Args:
        path: the model directory.
        device: where to put the model.
        sampler: optional sampler config (``class_path``/``init_args``) replacing the saved one.
    """
    from safetensors.torch import load_file

    from starkit.tokenizers import MultiScaleVQ
    config = read_model_config(path)
    tokenizer_dir = os.path.join(path, config["tokenizer"])
    tokenizer = MultiScaleVQ.from_pretrained(tokenizer_dir, frozen=True)
    tokenizer.hparams["pretrained"] = tokenizer_dir  # its weights have a home: keep them out of checkpoints
    text_encoder = text_encoder_from_config(config, path)
    gen_args = dict(config["generator"], stage="generator")  # a training stage means nothing at inference
    generator = ScaleWiseGenerator(
        tokenizer=tokenizer, text_encoder=text_encoder, positional=_positional_factory(config.get("positional")),
        sampler=build_from_config(sampler, ScaleSampler, "sampler") if sampler else sampler_from_config(config),
        **gen_args,
    )
    weights = load_file(os.path.join(path, "generator.safetensors"), device="cpu")
    own = {k: v for k, v in generator.state_dict().items() if k.startswith(("transformer.", "sampler."))}
    missing = sorted(k for k in own if k not in weights and not k.startswith("sampler."))
    saved_head = [k for k in weights if k.startswith("sampler.") and k in own]
    if saved_head:  # a head is loaded whole or not at all (a partial one would pass as trained)
        missing += sorted(k for k in own if k.startswith("sampler.") and k not in weights)
    if sampler is not None and not any(k.startswith("sampler.") for k in own):
        # a sampler chosen at load time without weights (e.g. parallel): the saved head is unused
        weights = {k: v for k, v in weights.items() if not k.startswith("sampler.")}
    unexpected = sorted(k for k in weights if k not in own)
    mismatched = sorted(k for k in own if k in weights and weights[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        from starkit.utils.checkpoint_io import component_mismatches
        why = "".join(f" {w}." for w in component_mismatches(own, weights, what=f"{path}/generator.safetensors"))
        raise RuntimeError(
            f"{path}/generator.safetensors does not match the architecture in starkit.json: missing "
            f"{missing[:8]}, unexpected {unexpected[:8]}, shape mismatches {mismatched[:8]}. The directory "
            f"is inconsistent: export it again with `starkit export`.{why}")
    generator.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=False)
    return generator.to(device).eval()


def sampler_config(sampler) -> dict:
    """The sampler's ``class_path``/``init_args`` with its current settings: a setting changed on the object
    after construction (``generator.sampler.cfg = 2.0``) is what gets saved, not the constructor's value."""
    sampler.validate()  # settings assigned directly are not checked on assignment
    config = component_config(sampler)
    init_args = config.get("init_args") or {}
    for key in init_args:
        value = getattr(sampler, key, init_args[key])
        if isinstance(value, (bool, int, float, str)) or value is None:
            init_args[key] = value
    return config


def save_model_dir(generator: ScaleWiseGenerator, path: str, dtype: Optional[torch.dtype] = None,
                   use_ema: bool = True, copy_text_encoder: bool = False) -> None:
    """Write a generator (with its tokenizer and text-encoder reference) as a model directory."""
    os.makedirs(path, exist_ok=True)
    hp = dict(generator.hparams)
    gen_args = {k: v for k, v in hp.items() if k not in COMPONENT_ARGS + NOT_EXPORTED}
    gen_args["ema_decay"] = None  # the exported transformer IS the EMA (when there is one)
    gen_args["stage"] = "generator"  # the sampler-head stage is training-only: any sampler may load the model
    gen_args["patch_nums"] = list(generator.patch_nums)
    text_cfg = component_config(generator.text_encoder)
    if copy_text_encoder and hasattr(generator.text_encoder, "save_to"):
        generator.text_encoder.save_to(os.path.join(path, "text_encoder"))
        text_cfg["init_args"]["name_or_path"] = "${MODEL_DIR}/text_encoder"
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "generator": gen_args,
        "tokenizer": "tokenizer", "text_encoder": text_cfg,
        "positional": component_config(hp.get("positional")) if hp.get("positional") else None,
        "sampler": sampler_config(generator.sampler),
    }
    generator.tokenizer.save_pretrained(os.path.join(path, "tokenizer"), dtype=dtype)
    source = generator.ema if (use_ema and generator.ema is not None) else generator.transformer
    tensors = {f"transformer.{k}": v for k, v in source.state_dict().items()}
    tensors.update({f"sampler.{k}": v for k, v in generator.sampler.state_dict().items()})
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in tensors.items()}
    atomic_save_safetensors(os.path.join(path, "generator.safetensors"), tensors, metadata={"format": "pt"})
    atomic_write_bytes(os.path.join(path, "starkit.json"), json.dumps(config, indent=2, default=str).encode())


class StarPipeline:
    """Text in, images out, from a self-contained model directory.

    Example::

        pipe = StarPipeline.from_pretrained("models/demo")
        images = pipe(["a red circle left of a blue square"], seed=0)
        images[0].save("out.png")

    Args:
        generator: a :class:`ScaleWiseGenerator` (with its tokenizer and text encoder).
    """

    def __init__(self, generator: ScaleWiseGenerator) -> None:
        self.generator = generator.eval()

    @classmethod
    def from_pretrained(cls, path: str, device: Union[str, torch.device] = "cpu",
                        sampler: Optional[dict] = None) -> "StarPipeline":
        """Load a model directory written by ``starkit export`` or :meth:`save_pretrained`."""
        return cls(load_generator(path, device=device, sampler=sampler))

    def save_pretrained(self, path: str, dtype: Optional[torch.dtype] = None) -> None:
        """Write the model directory (see the module docstring)."""
        save_model_dir(self.generator, path, dtype=dtype)

    def to(self, device) -> "StarPipeline":
        """Move the generator (``nn.Module.to`` arguments: a device, or a dtype); returns the pipeline."""
        self.generator.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """The generator's device."""
        return self.generator.device

    def __call__(self, prompts: Union[str, Sequence[str]], seed: Union[None, int, Sequence[int]] = None,
                 cfg: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, temperature: Optional[float] = None,
                 num_images_per_prompt: int = 1, sampler=None, batch_size: int = 16,
                 cuda_graphs: Union[bool, str] = False, compile_blocks: bool = False,
                 fp8: bool = False) -> List[Image.Image]:
        """Generate images; settings left as None use the model's sampler defaults.

        Args:
            prompts: a prompt or a list of prompts.
            seed: sampling seed (same seed, same images); or a list with one seed per prompt: each image is
                then drawn from its own seed, whatever the batching (see :meth:`ScaleWiseGenerator.generate`).
            cfg, top_k, top_p, temperature: sampling settings for this call.
            num_images_per_prompt: images per prompt (consecutive in the result).
            sampler: a :class:`~starkit.samplers.ScaleSampler` to use instead of the model's.
            batch_size: prompts generated together (batch b uses ``seed + b``).
            cuda_graphs: replay the per-scale steps from CUDA graphs (on an H200 1.5-7.7x the eager loop
                at batch 1, with the compiled VQ decoder; see :meth:`ScaleWiseGenerator.generate`); "whole":
                the whole generation after the text encoding as one CUDA graph.
            compile_blocks: the blocks' element-wise work as compiled regions (see
                :meth:`ScaleWiseGenerator.generate`).
            fp8: the blocks' linear layers in float8 (an approximation; see :meth:`ScaleWiseGenerator.generate`).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("The prompt list is empty: give at least one prompt.")
        from starkit.generator.sampling import check_count, check_seed, is_single_seed
        check_count("batch_size", batch_size)
        seed = check_seed(seed)
        seeds = None if seed is None or is_single_seed(seed) else list(seed)  # one per prompt
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one int, or one seed per prompt.")
        out: List[Image.Image] = []
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            batch_seed = (seeds[start:start + batch_size] if seeds is not None
                          else None if seed is None else int(seed) + b)
            images = self.generator.generate(
                prompts[start:start + batch_size], cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                seed=batch_seed, num_images_per_prompt=num_images_per_prompt, sampler=sampler,
                cuda_graphs=cuda_graphs, compile_blocks=compile_blocks, fp8=fp8)
            out.extend(images_to_pil(images))
        return out


def _load_pretrained(path: str, sampler: Optional[dict] = None, cuda_graphs: Union[bool, str] = False,
                     compile_blocks: bool = False, fp8: bool = False) -> ScaleWiseGenerator:
    """A generator loaded from a model directory (for ``starkit predict``).

    Args:
        path: the model directory written by ``starkit export`` or ``starkit convert``.
        sampler: optional sampler config (class_path/init_args) replacing the saved one.
        cuda_graphs: predict with ``generate(cuda_graphs=True)`` (on a GPU: per-scale steps replayed
            from CUDA graphs; one capture per batch shape), or "whole" (the whole generation after the text
            encoding as one CUDA graph; see ``ScaleWiseGenerator.generate``).
        compile_blocks: predict with ``generate(compile_blocks=True)`` (the blocks' element-wise work
            in compiled regions; the first batch compiles).
        fp8: predict with ``generate(fp8=True)`` (the blocks' linear layers in float8 e4m3, row-wise scales:
            faster with ``compile_blocks`` on Hopper-class GPUs, images ~4%-per-product off bf16's).
    """
    from starkit.generator.hparams import own_hyperparameters
    with own_hyperparameters():
        generator = load_generator(path, sampler=sampler)
    from starkit.generator.sampling import check_cuda_graphs
    check_cuda_graphs(cuda_graphs)
    generator.predict_options = dict(cuda_graphs=cuda_graphs, compile_blocks=bool(compile_blocks), fp8=bool(fp8))
    return generator


def _pretrained_class():
    from jsonargparse import class_from_function
    cls = class_from_function(_load_pretrained, ScaleWiseGenerator, name="PretrainedGenerator")
    cls.__module__ = __name__
    cls.__doc__ = _load_pretrained.__doc__
    return cls


#: YAML: ``model: {class_path: starkit.pipeline.PretrainedGenerator, init_args: {path: DIR}}``
PretrainedGenerator = _pretrained_class()
