"""An analytic detector for the shapes world (no learned weights).

For a batch of images it finds the objects of the palette and estimates, for each, its
colour, shape, size, centre and bounding box:

1. background: the median colour of the one-pixel border of each image;
2. foreground: pixels farther than ``background_distance`` (RGB) from it;
3. colour: each pixel with chroma (max - min channel) above ``chroma_threshold`` takes the
   palette colour of nearest hue, if within ``max_hue_distance`` degrees (hue is unchanged by darkening, blurring against a grey
   background or JPEG luma loss, so it is more robust than RGB distance);
4. objects: 4-connected components of the pixels farther than ``background_distance`` from
   the background (``scipy.ndimage.label``), those smaller than ``min_area`` (a fraction of
   the image area) dropped; each is trimmed to the pixels above ``core_fraction`` of its
   90th-percentile distance (its true edge, even when blurred), and takes the majority colour
   class of those pixels (None when no palette colour holds a majority);
5. shape: the component's mask, cropped to its bounding box and resized to 16 x 16, is
   compared with a template of each shape drawn by the world itself; the nearest template
   (mean absolute difference) wins. A box more elongated than ``max_aspect``, or a mask far
   from every template, is shape ``unknown`` (so blobs of noise never pass);
6. size: ``large`` when the longer box side exceeds ``size_threshold`` of the image side.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

try:
    from scipy import ndimage
except ImportError:  # pragma: no cover
    ndimage = None

from starkit.data.shapes import PALETTE, SHAPES, ShapesWorld


def _hue(rgb: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Hue in degrees and chroma (0..255) of float RGB ``(..., 3)`` in 0..255."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    c = np.maximum(chroma, 1e-6)
    hue = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return hue * 60.0, chroma


def _templates(side: int = 16) -> np.ndarray:
    """Each shape drawn by the world filling a ``side`` x ``side`` box, as floats in [0, 1]."""
    world = ShapesWorld(resolution=side * 4, textured_background_prob=0.0)
    out = []
    for shape in SHAPES:
        truth = {"background": {"kind": "plain", "level": 0, "texture_seed": 0},
                 "objects": [{"colour": "red", "shape": shape, "bbox": [0.0, 0.0, 1.0, 1.0]}]}
        red = np.asarray(world.draw(truth))[..., 0].astype(np.float32) / PALETTE["red"][0]
        out.append(np.asarray(Image.fromarray(red, "F").resize((side, side), Image.BILINEAR)))
    return np.clip(np.stack(out), 0, 1)


class ShapesDetector:
    """Finds palette-coloured shapes in images of the shapes world.

    Args:
        chroma_threshold: minimum chroma (0..255) of a foreground pixel.
        background_distance: minimum RGB distance (0..255) from the estimated background.
        max_hue_distance: a pixel further than this (degrees) from every palette hue is ignored.
        min_area: components smaller than this fraction of the image area are dropped.
        max_aspect: components whose box is more elongated than this are shape ``unknown``.
        max_template_error: a component whose mean absolute difference to every shape
            template exceeds this is shape ``unknown``.
        core_fraction: within a component, pixels whose background distance is below this
            fraction of the component's 90th-percentile distance are trimmed (the object's edge).
        size_threshold: longer box side / image side above which an object is ``large``.
    """

    def __init__(self, chroma_threshold: float = 40.0, background_distance: float = 60.0,
                 max_hue_distance: float = 30.0, min_area: float = 0.005, max_aspect: float = 1.6,
                 max_template_error: float = 0.3, core_fraction: float = 0.4, size_threshold: float = 0.23):
        if ndimage is None:  # pragma: no cover
            raise ImportError("ShapesDetector needs scipy (connected components): pip install scipy")
        self.chroma_threshold, self.background_distance = chroma_threshold, background_distance
        self.max_hue_distance, self.min_area, self.max_aspect = max_hue_distance, min_area, max_aspect
        self.max_template_error, self.core_fraction = max_template_error, core_fraction
        self.size_threshold = size_threshold
        self.colours = list(PALETTE)
        self.palette_hue = _hue(np.array(list(PALETTE.values()), dtype=np.float32))[0]  # (K,)
        self.templates = _templates()  # (4, 16, 16)

    def classify(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Distance to the background colour ``(B, H, W)`` and colour class per pixel ``(B, H, W)`` int
        (-1 where the pixel is not chromatic or far from every palette hue).

        Args:
            images: ``(B, H, W, 3)`` uint8 or float in 0..255.
        """
        x = images.astype(np.float32)
        border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # (B, 4W, 3)
        background = np.median(border, axis=1)[:, None, None]  # (B, 1, 1, 3)
        distance = np.linalg.norm(x - background, axis=-1)  # (B, H, W)
        hue, chroma = _hue(x)
        d = np.abs(hue[..., None] - self.palette_hue)  # (B, H, W, K)
        d = np.minimum(d, 360.0 - d)
        classes = d.argmin(-1)
        ok = (chroma > self.chroma_threshold) & (np.take_along_axis(d, classes[..., None], -1)[..., 0]
                                                 <= self.max_hue_distance)
        return distance, np.where(ok, classes, -1)

    def shape_of(self, mask: np.ndarray) -> str:
        """Shape name of one component given its mask cropped to its bounding box ``(h, w)``."""
        h, w = mask.shape
        if max(h, w) > self.max_aspect * min(h, w):
            return "unknown"
        side = self.templates.shape[-1]
        crop = Image.fromarray(mask.astype(np.float32), "F").resize((side, side), Image.BILINEAR)
        error = np.abs(self.templates - np.asarray(crop)).mean(axis=(1, 2))  # (4,)
        if error.min() > self.max_template_error:
            return "unknown"
        return SHAPES[int(error.argmin())]

    def __call__(self, images: np.ndarray) -> List[List[Dict]]:
        """Detect the objects of each image.

        Args:
            images: ``(B, H, W, 3)`` uint8 (or float in 0..255).

        Returns:
            One list per image of dicts: ``colour``, ``shape``, ``size``, ``center`` and
            ``bbox`` (in [0, 1] image units, y downwards) and ``area`` (pixels).
        """
        distance, classes = self.classify(images)
        B, H, W = classes.shape
        min_pixels = self.min_area * H * W
        found: List[List[Dict]] = []
        for b in range(B):
            labels, n = ndimage.label(distance[b] > self.background_distance)
            areas = np.bincount(labels.ravel(), minlength=n + 1)
            objects = []
            for i, box in enumerate(ndimage.find_objects(labels), start=1):
                if box is None or areas[i] < min_pixels:
                    continue
                mask = labels[box] == i
                # half-maximum contour: the object's true edge even when blurred
                core = mask & (distance[b][box] > self.core_fraction * np.percentile(distance[b][box][mask], 90))
                rows, cols = np.flatnonzero(core.any(1)), np.flatnonzero(core.any(0))
                box = (slice(box[0].start + rows[0], box[0].start + rows[-1] + 1),
                       slice(box[1].start + cols[0], box[1].start + cols[-1] + 1))
                core = core[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
                votes = np.bincount(classes[b][box][core] + 1, minlength=len(self.colours) + 1)  # [none, K...]
                colour = self.colours[int(votes[1:].argmax())] if votes[1:].max() > 0.5 * votes.sum() else None
                (y0, y1), (x0, x1) = (box[0].start, box[0].stop), (box[1].start, box[1].stop)
                side = max(y1 - y0, x1 - x0) / float(max(H, W))
                objects.append({
                    "colour": colour, "shape": self.shape_of(core),
                    "size": "large" if side > self.size_threshold else "small",
                    "center": [(x0 + x1) / 2 / W, (y0 + y1) / 2 / H],
                    "bbox": [x0 / W, y0 / H, x1 / W, y1 / H], "area": int(areas[i])})
            found.append(objects)
        return found
