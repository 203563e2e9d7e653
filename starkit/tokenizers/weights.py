"""Weight files of the tokenizer: safe loading, VAR config inference, atomic saving, and
reconstruction image logging."""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any, Dict

import torch

CONVERT_HINT = (
    "If you trust this file, convert it once to a plain state dict of tensors, e.g.\n"
    "    sd = torch.load(path, weights_only=False, map_location='cpu')  # runs the file's pickled code\n"
    "    torch.save({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, 'clean.pth')\n"
    "or save it with MultiScaleVQ.save_pretrained(dir) (config.json + model.safetensors)."
)


def load_weights_file(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` / ``.pt`` / ``.ckpt`` file (``weights_only=True``), a
    ``.safetensors`` file, or a ``save_pretrained`` directory. Refuses unsafe pickles."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.exists(path):
        hint = (" VAR's tokenizer is the file vae_ch160v4096z32.pth of the Hugging Face repository FoundationVision/var "
                "(`hf download FoundationVision/var vae_ch160v4096z32.pth --local-dir checkpoints`)"
                if "vae_ch160v4096z32" in os.path.basename(path) else "")
        raise FileNotFoundError(f"no tokenizer weights at {path!r}: give a VAR .pth, a .safetensors file or a "
                                f"tokenizer directory (MultiScaleVQ.save_pretrained).{hint}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    from starkit.utils.checkpoint_io import check_checkpoint_file
    check_checkpoint_file(path, "tokenizer weights")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise ValueError(f"refusing to load {path!r}: it needs unsafe unpickling (torch.load with "
                         f"weights_only=True failed: {str(err).splitlines()[0]}).\n{CONVERT_HINT}") from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a Lightning checkpoint saved with plain hyper-parameters
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} is not a state dict of tensors.\n{CONVERT_HINT}")
    return obj


def infer_var_config(sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """MultiScaleVQ init arguments read off the shapes of a VAR-layout state dict."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        ch_mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        codebook_size, z = sd["quantize.embedding.weight"].shape
    except KeyError as err:
        raise ValueError(f"not a VAR VQVAE state dict (missing {err}); keys start with "
                         f"{sorted(sd)[:5]}") from err
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        share = len({k.split(".")[3] for k in sd if k.startswith("quantize.quant_resi.qresi_ls.")})
    elif "quantize.quant_resi.qresi.weight" in sd:
        share = 1
    else:
        share = 0
    return dict(ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks), z_channels=z, codebook_size=codebook_size,
                share_quant_resi=share, quant_conv_ks=sd["quant_conv.weight"].shape[-1],
                using_sa="encoder.down.%d.attn.0.qkv.weight" % levels[-1] in sd,
                using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd)


def save_pretrained_dir(directory: str, config: Dict[str, Any], state_dict: Dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``, each atomically."""
    from starkit.utils.io import atomic_save_safetensors, atomic_write_bytes
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_save_safetensors(os.path.join(directory, "model.safetensors"), tensors, metadata={"format": "pt"})
    atomic_write_bytes(os.path.join(directory, "config.json"), json.dumps(config, indent=2, sort_keys=True).encode())


@torch.no_grad()
def log_images(module, originals01: torch.Tensor, recons01: torch.Tensor) -> None:
    """Log a grid (originals on top, reconstructions below) to TensorBoard, else as PNG
    under the trainer's log dir. Does nothing without a trainer or a logger."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not trainer.loggers or trainer.global_rank != 0:
        return
    top = torch.cat(list(originals01), dim=-1)  # (3, H, n*W)
    bottom = torch.cat(list(recons01), dim=-1)
    grid = torch.cat([top, bottom], dim=-2).clamp(0, 1).float().cpu()  # (3, 2H, n*W)
    step = trainer.global_step
    from lightning.pytorch.loggers import TensorBoardLogger
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image("val/reconstructions", grid, step)
            return
    from PIL import Image
    log_dir = trainer.log_dir or trainer.default_root_dir
    out = os.path.join(log_dir, "reconstructions")
    os.makedirs(out, exist_ok=True)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(arr).save(os.path.join(out, f"step{step:08d}.png"))
