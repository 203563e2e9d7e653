"""Checkpoints that survive a kill and never run a file's pickled code.

- :class:`AtomicCheckpointIO`: Lightning's ``TorchCheckpointIO`` that writes each checkpoint
  to a temporary file in the same folder, flushes it to disk, then renames it over the
  final name (``os.replace``). A run killed mid-write leaves the previous ``last.ckpt``
  whole. It loads with ``torch.load(weights_only=True)`` and refuses a file that needs
  arbitrary unpickling with a message that says how to convert a trusted one.
  ``starkit fit`` uses it by default (``starkit/cli.py``).
- :func:`safe_torch_load`: the same safe read for any ``.ckpt`` / ``.pth`` / ``.pt`` file.
- :func:`component_mismatches`: names, in words, the component (text encoder width,
  tokenizer codebook size or embedding width, model width) behind shape mismatches
  between a generator's state dict and another one.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from starkit.utils.io import temp_file

CONVERT_HINT = (
    "If you trust this file, convert it once to plain tensors and Python values, e.g.\n"
    "    ckpt = torch.load(path, weights_only=False, map_location='cpu')  # runs the file's pickled code\n"
    "    torch.save({'state_dict': {k: v for k, v in ckpt['state_dict'].items() if isinstance(v, torch.Tensor)},\n"
    "                'hyper_parameters': <plain dict of the model's arguments>}, 'clean.ckpt')\n"
    "or export a model directory with safetensors weights (`starkit export`)."
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint that can only be read by running arbitrary pickled code."""


class NotACheckpointError(ValueError):
    """A file given as a checkpoint that is empty, cut short, or not a PyTorch file at all."""


def checkpoint_file_problem(path: str) -> Optional[str]:
    """Why the file at ``path`` cannot be a ``torch.save`` checkpoint, and what to do, from its first bytes and
    its zip directory (cheap: nothing is unpickled), or None when it looks like one. ``torch.load`` words these
    cases as ``EOFError``, ``KeyError: 101`` or "weights only load failed", which read like a safety refusal."""
    import zipfile
    size = os.path.getsize(path)
    cut_short = ("the write, download or copy that made it was cut short: copy or download it again, or use an "
                 "earlier checkpoint (e.g. the previous epoch's)")
    if size == 0:
        return f"it is empty (0 bytes); {cut_short}"
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return f"it is truncated or damaged ({size} bytes, no zip directory at its end); {cut_short}"
        return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # the legacy pickle format
        return None
    wrong = "give the .ckpt / .pth file written by torch.save (a training run's checkpoints/*.ckpt)"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return f"it is a safetensors file (plain weights), not a torch.save checkpoint; {wrong}"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it is not a PyTorch checkpoint (it starts with the bytes {head[:8]!r}); {wrong}"
    return f"it is a text file, not a PyTorch checkpoint (it starts with {text.strip()[:40]!r}); {wrong}"


def check_checkpoint_file(path: str, what: str = "a checkpoint") -> None:
    """Raise :class:`NotACheckpointError` naming the file, the cause and the fix if it cannot be a checkpoint."""
    if os.path.isfile(path):
        problem = checkpoint_file_problem(path)
        if problem:
            raise NotACheckpointError(f"{path!r} is not {what}: {problem}.")


def safe_torch_load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file that needs unsafe unpickling raises
    :class:`UnsafeCheckpointError` naming the file and how to convert a trusted one."""
    check_checkpoint_file(str(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, AttributeError, TypeError, RuntimeError) as err:
        text = str(err)
        if isinstance(err, RuntimeError) and "weights_only" not in text and "Unpickl" not in text:
            raise  # e.g. a truncated file: not a safety question
        raise UnsafeCheckpointError(
            f"refusing to load {str(path)!r}: it needs unsafe unpickling (torch.load with weights_only=True "
            f"failed: {text.strip().splitlines()[0] if text.strip() else type(err).__name__}).\n{CONVERT_HINT}"
        ) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint IO with atomic writes (temp file + fsync + ``os.replace``) and safe reads.

    In YAML: ``trainer.plugins: [{class_path: starkit.utils.AtomicCheckpointIO}]`` (the
    ``starkit`` CLI adds it when no checkpoint IO plugin is given).
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = str(path)
        if "://" in path:  # remote filesystems: Lightning's own transaction-based write
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options.")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = temp_file(folder, f".{os.path.basename(path)}.", ".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:  # pragma: no cover - platforms without directory fsync
            pass

    def load_checkpoint(self, path, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        path = str(path)
        if "://" in path:
            return super().load_checkpoint(path, map_location, weights_only=True if weights_only is None else weights_only)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        if weights_only is False:  # an explicit opt-in by the caller
            return torch.load(path, map_location=map_location, weights_only=False)
        return safe_torch_load(path, map_location=map_location)


def component_mismatches(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                         prefix: str = "transformer.", what: str = "the checkpoint") -> List[str]:
    """Sentences naming the component behind shape mismatches of a generator's transformer.

    ``own`` is this generator's state dict, ``given`` the loaded one (both with ``prefix``).
    Reads: ``word_embed.weight (C, Cvae)``, ``head_logits.weight (V, C)``,
    ``encoder_proj.weight (C, D_text)`` and ``blocks.*.cross_attn.mat_kv.weight (2C, D_text)``.
    """
    def shape(sd, key):
        value = sd.get(prefix + key)
        return tuple(value.shape) if value is not None else None

    out = []
    checks = (
        ("encoder_proj.weight", 1, "a text encoder of width {theirs}; this text encoder has width {ours} "
                                   "(text_encoder.dim)"),
        ("head_logits.weight", 0, "a tokenizer with codebook size {theirs}; this tokenizer has {ours} "
                                  "(tokenizer.codebook_size)"),
        ("word_embed.weight", 1, "a tokenizer with embedding width {theirs}; this tokenizer has {ours} "
                                 "(tokenizer.embed_dim)"),
        ("word_embed.weight", 0, "a transformer of width {theirs}; this one has width {ours} (size/width)"),
    )
    for key, dim, sentence in checks:
        a, b = shape(own, key), shape(given, key)
        if a is not None and b is not None and len(a) == len(b) and a[dim] != b[dim]:
            out.append(f"{what} was built for " + sentence.format(theirs=b[dim], ours=a[dim]))
    kv = sorted(k for k in own if k.startswith(prefix) and k.endswith("cross_attn.mat_kv.weight"))
    if kv and not any("text encoder" in s for s in out):
        a, b = shape(own, kv[0][len(prefix):]), shape(given, kv[0][len(prefix):])
        if a is not None and b is not None and a[1] != b[1]:
            out.append(f"{what} was built for a text encoder of width {b[1]}; this text encoder has width "
                       f"{a[1]} (text_encoder.dim)")
    return out
