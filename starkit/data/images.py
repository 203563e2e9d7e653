"""Image loading that survives real-world files, and VAR's training transforms.

Two public functions do the work:

* :func:`load_rgb` opens one file and returns an 8-bit RGB ``PIL.Image`` or raises
  :class:`SampleError` naming a *cause* (``"undecodable"``, ``"too_large"`` ...). It
  applies the EXIF orientation and converts every other mode to RGB (alpha is
  composited on white, 16-bit is scaled to 8-bit), reporting each repair it made.
* :func:`load_sample` reads one :class:`CaptionedItem` (image and caption) with the
  size checks of the data module, raising :class:`SampleError` or recording repairs.
* :func:`var_transform` builds VAR's transform: resize the short side to
  ``round(1.125 * R)`` with LANCZOS, crop ``R x R`` (random for training, centre for
  validation), then a ``(3, R, R)`` float tensor in ``[-1, 1]``.

Nothing here depends on torchvision; the tensor conversion uses torch alone.
"""
from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import get_worker_info

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""File extensions (lower case) that the folder scan treats as candidate images."""

DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
"""Default decompression-bomb limit: images with more pixels are skipped unread."""

MAX_ASPECT_RATIO = 16.0
"""Images longer than this many times their short side are skipped: resizing the short
side to ~1.125 R would make the long side huge (a 'thin-strip' bomb)."""

# Skip causes: the sample is not used. Repair causes: it is used after a fix.
SKIP_CAUSES = (
    "empty_file",  # zero bytes on disk
    "missing_file",  # listed (manifest) but not on disk, or vanished after the scan
    "undecodable",  # not an image, corrupt, truncated, or an unsupported format
    "too_large",  # more pixels than max_image_pixels (decompression bomb)
    "too_small",  # short side < resolution while min_size_policy="skip"
    "extreme_aspect",  # long side > MAX_ASPECT_RATIO * short side
    "missing_caption",  # no caption while missing_caption="skip"
    "caption_unreadable",  # the caption file exists but cannot be read (I/O error)
)
REPAIR_CAUSES = (
    "grayscale",  # L / 1 / I / F turned into RGB
    "alpha_composited",  # RGBA / LA / PA / P-with-transparency composited on white
    "palette",  # P without transparency expanded to RGB
    "cmyk",  # CMYK converted to RGB
    "high_bit_depth",  # 16-bit (I;16, I) or float (F) scaled to 8-bit
    "other_mode",  # YCbCr, LAB, HSV ... converted by PIL
    "exif_rotated",  # EXIF orientation applied
    "upscaled",  # short side < resolution, upscaled (min_size_policy="upscale")
    "caption_not_utf8",  # caption decoded with errors="replace"
    "caption_empty",  # caption present but blank: "" used
    "caption_missing",  # no caption at all: "" used (missing_caption="empty")
)


class SampleError(Exception):
    """A sample that cannot be used; ``cause`` is one of :data:`SKIP_CAUSES`.

    Args:
        cause: Short machine-readable reason, used as the key of the skip counts.
        message: Human-readable detail (usually includes the path).
    """

    def __init__(self, cause: str, message: str):
        super().__init__(f"{cause}: {message}")
        self.cause, self.detail = cause, message


def load_rgb(
    path: str,
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    repairs: Optional[List[str]] = None,
) -> Image.Image:
    """Open an image file as a fully decoded 8-bit RGB ``PIL.Image``.

    The format is detected from the bytes, not the extension, so a PNG named ``.jpg``
    opens fine. The size is checked against ``max_pixels`` from the header, before the
    pixels are decoded.

    Args:
        path: The image file.
        max_pixels: Largest accepted ``width * height``; ``None`` disables the check.
        repairs: If given, the names of the repairs made (see :data:`REPAIR_CAUSES`)
            are appended to it.

    Returns:
        The decoded image in mode ``"RGB"``, EXIF orientation applied.

    Raises:
        SampleError: With cause ``missing_file``, ``empty_file``, ``too_large`` or
            ``undecodable``.
    """
    repairs = [] if repairs is None else repairs
    try:
        if os.path.getsize(path) == 0:
            raise SampleError("empty_file", f"{path} has zero bytes")
    except OSError as err:
        raise SampleError("missing_file", f"{path}: {err}") from None
    return decode_rgb(path, path, max_pixels, repairs)


_PILLOW_LIMIT_LOCK = threading.Lock()
_pillow_limit_state = {"users": 0, "saved": None}


@contextlib.contextmanager
def _pillow_limit_off():
    """Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, ~179 M pixels raise) switched off while
    images are opened here: ``max_pixels`` is checked from the header instead, so that ``None`` means no limit
    and a limit above Pillow's is honoured. Restored when the last overlapping user (threads) leaves."""
    with _PILLOW_LIMIT_LOCK:
        if _pillow_limit_state["users"] == 0:
            _pillow_limit_state["saved"] = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pillow_limit_state["users"] += 1
    try:
        yield
    finally:
        with _PILLOW_LIMIT_LOCK:
            _pillow_limit_state["users"] -= 1
            if _pillow_limit_state["users"] == 0:
                Image.MAX_IMAGE_PIXELS = _pillow_limit_state["saved"]


def decode_rgb(source, name: str, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
               repairs: Optional[List[str]] = None) -> Image.Image:
    """Decode an image from a path, a file object or ``bytes`` (e.g. a tar member) into RGB.

    Same checks and repairs as :func:`load_rgb` (size limit from the header, full decode,
    EXIF orientation, :func:`to_rgb`).

    Args:
        source: a path, a binary file object, or the file's bytes.
        name: how the sample is named in error messages.
        max_pixels: largest accepted ``width * height``; ``None`` disables the check (Pillow's own limit,
            ``Image.MAX_IMAGE_PIXELS``, does not apply here: this one replaces it).
        repairs: if given, the names of the repairs made are appended to it.

    Raises:
        SampleError: with cause ``empty_file``, ``too_large`` or ``undecodable``.
    """
    repairs = [] if repairs is None else repairs
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise SampleError("empty_file", f"{name} has zero bytes")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings(), _pillow_limit_off():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise SampleError(
                        "too_large", f"{name} is {width}x{height}, over {max_pixels} pixels"
                    )
                img.load()  # decode now, so truncation fails here, not in the transform
                oriented = img
                if _rotated(img):
                    try:
                        oriented = ImageOps.exif_transpose(img)
                        repairs.append("exif_rotated")
                    except Exception:  # a broken EXIF block must not lose the pixels
                        oriented = img
                return to_rgb(oriented, repairs)
    except SampleError:
        raise
    except Image.DecompressionBombError as err:
        raise SampleError("too_large", f"{name}: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise SampleError("undecodable", f"{name}: {type(err).__name__}: {err}") from None
    except Exception as err:  # decoder bugs: any other failure still only skips the file
        raise SampleError("undecodable", f"{name}: {type(err).__name__}: {err}") from None


def _rotated(img: Image.Image) -> bool:
    """Whether the EXIF orientation tag asks for anything but the identity."""
    try:
        return img.getexif().get(0x0112, 1) not in (1, None)
    except Exception:
        return False


def to_rgb(img: Image.Image, repairs: Optional[List[str]] = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, recording the repair made.

    Transparent images are composited on white; 16-bit and float images are scaled to
    8-bit rather than clipped (a plain ``convert`` would turn most of them white).

    Args:
        img: A loaded image in any mode.
        repairs: If given, the repair name is appended to it.

    Returns:
        An image in mode ``"RGB"``.
    """
    repairs = [] if repairs is None else repairs
    mode = img.mode
    if mode == "RGB":
        return img
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        repairs.append("alpha_composited")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        repairs.append("high_bit_depth")
        return _scale_to_8bit(img).convert("RGB")
    named = {"P": "palette", "CMYK": "cmyk", "L": "grayscale", "1": "grayscale"}
    repairs.append(named.get(mode, "other_mode"))
    return img.convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """Scale an ``I;16*``, ``I`` or ``F`` image to mode ``L`` without clipping."""
    if img.mode == "F":
        low, high = img.getextrema()
        scale = 255.0 if high <= 1.0 else 1.0  # floats in [0, 1] or already in [0, 255]
        return img.point(lambda v: v * scale).convert("L")
    wide = img.convert("I")
    low, high = wide.getextrema()
    if img.mode.startswith("I;16") or 255 < high <= 65535:
        scale = 255.0 / 65535.0
    elif high > 65535:
        scale = 255.0 / high
    else:
        scale = 1.0
    return wide.point(lambda v: v * scale).convert("L")


class VarTransform:
    """VAR's image transform: short-side resize, square crop, tensor in ``[-1, 1]``.

    Args:
        resolution: Output side ``R`` in pixels.
        train: Random crop if ``True`` (uses ``torch``'s global RNG, which the
            DataLoader seeds per worker), centre crop otherwise.
        mid_ratio: The short side is first resized to ``round(mid_ratio * R)``.
    """

    def __init__(self, resolution: int, train: bool, mid_ratio: float = 1.125):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.train = train
        self.mid = max(resolution, round(mid_ratio * resolution))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Transform an RGB image into a ``(3, R, R)`` float tensor in ``[-1, 1]``."""
        width, height = img.size
        scale = self.mid / min(width, height)
        new_w = max(self.mid, round(width * scale))
        new_h = max(self.mid, round(height * scale))
        img = img.resize((new_w, new_h), Image.LANCZOS)
        r = self.resolution
        if self.train:
            left = int(torch.randint(0, new_w - r + 1, ()).item())
            top = int(torch.randint(0, new_h - r + 1, ()).item())
        else:
            left, top = round((new_w - r) / 2), round((new_h - r) / 2)
        img = img.crop((left, top, left + r, top + r))
        pixels_HWC = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(r, r, 3)
        return pixels_HWC.permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, R, R) in [-1, 1]

    def __repr__(self) -> str:
        return f"VarTransform(resolution={self.resolution}, train={self.train}, mid={self.mid})"


def var_transform(resolution: int, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """Build VAR's transform for ``resolution`` (see :class:`VarTransform`).

    Args:
        resolution: Output side ``R`` in pixels.
        train: Random crop for training, centre crop for validation.

    Returns:
        A picklable callable mapping an RGB ``PIL.Image`` to a ``(3, R, R)`` tensor.
    """
    return VarTransform(resolution, train)


@dataclass(frozen=True)
class CaptionedItem:
    """One indexed sample: where its image is and where its caption comes from.

    Args:
        image: Path of the image file.
        key: Stable relative path (``/``-separated), used for sorting and the split.
        caption: The caption itself (manifest), or ``None`` to read ``caption_file``.
        caption_file: The ``.txt`` caption (folder), or ``None`` if there is none.
    """

    image: str
    key: str
    caption: Optional[str] = None
    caption_file: Optional[str] = None


class SampleCounts:
    """Skipped and repaired samples by cause, counted in every DataLoader worker (one row of a
    shared-memory table per worker, row 0 for the main process) and warned about once per cause
    and process. Shared by the captioned-folder and WebDataset datasets.

    Args:
        causes: every cause the dataset can count (those of ``REPAIR_CAUSES`` are repairs).
        num_workers: DataLoader workers that will count.
    """

    def __init__(self, causes: Tuple[str, ...], num_workers: int) -> None:
        self.causes = tuple(causes)
        self.index = {cause: i for i, cause in enumerate(self.causes)}
        self.table = torch.zeros(num_workers + 1, len(self.causes), dtype=torch.int64).share_memory_()
        self.warned: set = set()  # per process: causes already warned about

    def count(self, cause: str, name: str, detail: str = "") -> None:
        """Count ``cause`` for sample ``name``; the first time in this process, warn."""
        info = get_worker_info()
        row = 0 if info is None else min(info.id + 1, self.table.shape[0] - 1)
        self.table[row, self.index[cause]] += 1
        if cause not in self.warned:
            self.warned.add(cause)
            verb = "repaired" if cause in REPAIR_CAUSES else "skipping"
            rank_zero_warn(f"starkit.data: {verb} {name} ({cause}{'; ' + detail if detail else ''}). "
                           f"Further '{cause}' cases are only counted: see skipped_counts().")

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Counts by cause, summed over workers: ``{"skipped": {...}, "repaired": {...}}``."""
        out: Dict[str, Dict[str, int]] = {"skipped": {}, "repaired": {}}
        for cause, n in zip(self.causes, self.table.sum(0).tolist()):
            if n:
                out["repaired" if cause in REPAIR_CAUSES else "skipped"][cause] = int(n)
        return out


def split_counts(datasets: Dict[str, Any]) -> Dict[str, int]:
    """Flatten the ``stats`` of the datasets of each split into ``{"<split>/<kind>/<cause>": n}``
    (``kind`` is ``skipped`` or ``repaired``); splits without a dataset are left out."""
    out: Dict[str, int] = {}
    for split, dataset in datasets.items():
        if dataset is not None:
            for kind, counts in dataset.stats.items():
                out.update({f"{split}/{kind}/{cause}": n for cause, n in counts.items()})
    return out


def read_caption(item: CaptionedItem, missing_caption: str, repairs: List[str]) -> str:
    """The caption of ``item``, stripped; records repairs, raises :class:`SampleError`."""
    if item.caption is not None:
        text = item.caption
    elif item.caption_file is None:
        text = None
    else:
        try:
            with open(item.caption_file, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = None
        except OSError as err:
            raise SampleError("caption_unreadable", f"{item.caption_file}: {err}") from None
        text = None if raw is None else decode_caption(raw, repairs)
    return finish_caption(text, str(item.image), missing_caption, repairs)


def decode_caption(raw: bytes, repairs: List[str]) -> str:
    """Caption bytes as text: UTF-8 (a BOM dropped), else decoded with replacement characters and
    ``caption_not_utf8`` recorded in ``repairs``."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        repairs.append("caption_not_utf8")
        return raw.decode("utf-8", errors="replace")


def finish_caption(text: Optional[str], name: str, missing_caption: str, repairs: List[str]) -> str:
    """A caption read for sample ``name`` (None: it has none), stripped. A missing one raises
    ``SampleError("missing_caption")`` with ``missing_caption="skip"``, else becomes ``""`` (``caption_missing``
    recorded); an empty one is kept and ``caption_empty`` recorded."""
    if text is None:
        if missing_caption == "skip":
            raise SampleError("missing_caption", f"{name} has no caption")
        repairs.append("caption_missing")
        return ""
    text = text.strip()
    if not text:
        repairs.append("caption_empty")
    return text


def load_sample(
    item: CaptionedItem,
    resolution: int,
    max_pixels: Optional[int],
    min_size_policy: str,
    missing_caption: str,
    transform: Optional[Callable[[Image.Image], torch.Tensor]],
    repairs: List[str],
) -> dict:
    """Load one item as ``{"image": tensor, "caption": str, "path": str}``.

    Checks the size (``max_pixels``, :data:`MAX_ASPECT_RATIO`, short side against
    ``resolution`` under ``min_size_policy``), appends repairs to ``repairs`` and raises
    :class:`SampleError` for an unusable item. With ``transform=None`` the image is
    decoded and checked but not transformed (``"image"`` is ``None``): the setup probe.
    """
    caption = read_caption(item, missing_caption, repairs)
    img = load_rgb(item.image, max_pixels, repairs)
    short, long = sorted(img.size)
    if long > MAX_ASPECT_RATIO * short:
        raise SampleError("extreme_aspect", f"{item.image} is {img.size[0]}x{img.size[1]}")
    if short < resolution:
        if min_size_policy == "skip":
            raise SampleError("too_small", f"{item.image} is {img.size[0]}x{img.size[1]} < {resolution}")
        repairs.append("upscaled")
    try:
        image = transform(img) if transform is not None else None
    except Exception as err:  # e.g. MemoryError on a huge resize: skip the file, not the epoch
        raise SampleError("undecodable", f"{item.image}: transform failed: {err!r}") from None
    return {"image": image, "caption": caption, "path": item.image}
