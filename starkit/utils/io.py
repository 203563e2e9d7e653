"""Atomic writes: a crash or a kill never leaves a half-written file under the final name."""
from __future__ import annotations

import os
import tempfile
from typing import List, Optional, Tuple

import torch
from PIL import Image


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: the permissions ``open(path, "w")`` gives a new file (read once, at import: setting the umask to read it is
#: not thread-safe)
FILE_MODE = 0o666 & ~_umask()


def temp_file(folder: str, prefix: str, suffix: str = "") -> Tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder`` (for a write-then-rename), with the permissions of a plainly created
    file (:data:`FILE_MODE`): mkstemp's 0600 would survive the rename and leave images, model directories and
    checkpoints unreadable to the other users of a shared machine or a web server."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, FILE_MODE)
    return fd, tmp


def atomic_write_bytes(path: str, data: bytes, overwrite: bool = True) -> bool:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    With ``overwrite=False`` an existing file is left untouched and False is returned.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = temp_file(folder, ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if path exists: never overwrites
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(path: str, tensors: dict, metadata: Optional[dict] = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and a rename, with :data:`FILE_MODE` permissions
    (safetensors creates its files 0600)."""
    from safetensors.torch import save_file
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = temp_file(folder, f".{os.path.basename(path)}.", ".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_image(path: str, image: Image.Image, overwrite: bool = False) -> bool:
    """Save a PIL image as PNG atomically; by default never overwrites an existing file."""
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)


def images_to_pil(images: torch.Tensor) -> List[Image.Image]:
    """``(B, 3, H, W)`` float in [0, 1] or uint8 -> list of PIL RGB images."""
    if images.dtype != torch.uint8:
        images = images.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arrays]
