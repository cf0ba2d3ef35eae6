"""Anomaly maps: where an image is unusual, drawn over the image as a PNG.

A pixel is tinted red in proportion to a *strength* in [0, 1]. The colour scale is fixed per
bundle, never per image, so two maps of one bundle can be compared:

* local scores (``zmax``, ``zmax+mean``, ``patches``, the sums): the score's own map (how unusual each place
  is), full colour at the bundle's threshold and none at its lowest calibration score (:func:`local_strength`);
* global scores: the absolute difference between the image and its reconstruction (pixels in
  [0, 1]), full colour at :data:`FULL_SCALE` or more (:func:`difference`).

Small images are enlarged (nearest neighbour) to at least :data:`MIN_SIDE` pixels so the map is legible.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

from aemon.images import PNG_LEVEL

__all__ = ["FULL_SCALE", "MIN_SIDE", "MAPS_MODES", "difference", "enlarged_png", "local_strength", "render",
           "strengths", "tinted"]

#: Absolute pixel difference drawn at full colour.
FULL_SCALE = 0.5
#: Shortest side of a drawn map, in pixels.
MIN_SIDE = 128
#: ``AEMON_MAPS`` values: which items get a map.
MAPS_MODES = ("anomaly", "all", "off")
_TINT = np.array([1.0, 0.1, 0.0], dtype=np.float32)  # red with a touch of green: visible on grey


def difference(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Strength ``(N, H, W)``: the absolute difference of images and reconstructions ``(N, H, W, C)``
    over :data:`FULL_SCALE`."""
    return np.clip(np.abs(x.astype(np.float32) - recon.astype(np.float32)).mean(axis=-1) / FULL_SCALE, 0.0, 1.0)


def local_strength(where: np.ndarray, threshold: float, size: tuple[int, int], lowest: float = 0.0) -> np.ndarray:
    """Strength ``(N, H, W)`` from a local score's map ``(N, g_h, g_w)``: 1 at the threshold, 0 at the ``lowest``
    calibration score (no place is drawn that is less unusual than the least unusual normal image as a whole:
    a distance of ``patches`` is never 0, and normal images were tinted all over).

    The grid is enlarged to the image ``size`` by bilinear interpolation.
    """
    from PIL import Image

    base = lowest
    if threshold > base:
        scaled = np.clip((where - base) / (threshold - base), 0.0, 1.0).astype(np.float32)
    else:
        scaled = (where > threshold).astype(np.float32)
    h, w = size
    return np.stack([np.asarray(Image.fromarray(m, mode="F").resize((w, h), Image.BILINEAR)) for m in scaled])


def strengths(bundle, x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """The tint ``(N, H, W)`` of images ``x`` by a bundle: its score's local map if it has one, else the difference."""
    where = bundle.scorer.where(x, recon)
    if where is None:
        return difference(x, recon)
    scores = bundle.meta.calibration.scores
    return local_strength(where, bundle.threshold, x.shape[1:3], scores[0] if scores else 0.0)


def tinted(image: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """The image in grey, tinted red by ``strength`` ``(H, W)`` in [0, 1]: uint8 RGB ``(H, W, 3)``."""
    gray = image.astype(np.float32).mean(axis=-1)
    alpha = np.clip(strength, 0.0, 1.0)[..., None] * 0.85
    rgb = gray[..., None] * (1.0 - alpha) + _TINT * alpha
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def render(image: np.ndarray, strength: np.ndarray, shown: tuple[int, int] | None = None) -> bytes:
    """The map of one image as PNG bytes.

    Args:
        image: The model input ``(H, W, C)`` in [0, 1].
        strength: How strongly to tint each pixel, ``(H, W)`` in [0, 1].
        shown: The image file's own ``(width, height)``: a map of an image of another shape than the model's
            input is drawn in the image's shape (its longer side as long as the input's), so it lies over it.
    """
    pixels = tinted(image, strength)
    if shown is not None:
        pixels = _in_shape(pixels, shown)
    return enlarged_png(pixels, max(1, math.ceil(MIN_SIDE / max(1, min(pixels.shape[:2])))))


def _in_shape(pixels: np.ndarray, shown: tuple[int, int]) -> np.ndarray:
    """uint8 RGB ``pixels`` resampled (bilinear) to the aspect ratio of ``shown`` ``(width, height)``, unless
    it has it already (within 1 %)."""
    from PIL import Image

    h, w = pixels.shape[:2]
    width, height = shown
    if min(width, height) < 1 or abs(width * h - height * w) <= 0.01 * w * height:
        return pixels
    longer = max(h, w)
    size = (max(1, round(longer * width / max(width, height))), max(1, round(longer * height / max(width, height))))
    return np.asarray(Image.fromarray(pixels, "RGB").resize(size, Image.Resampling.BILINEAR))


def enlarged_png(pixels: np.ndarray, scale: int) -> bytes:
    """uint8 RGB ``pixels`` ``(H, W, 3)`` enlarged ``scale`` times (nearest neighbour), as PNG bytes.

    Written directly rather than through Pillow, which filters every row of the enlarged image one by one
    (0.6 ms a 140×140 map, most of the time a 10,000-row array spent on its maps): each repeated row is
    stored with PNG's "up" filter, all zeros, and the whole image is compressed once."""
    h, w = pixels.shape[:2]
    wide = pixels.repeat(scale, axis=1).reshape(h, w * scale * 3)
    rows = np.zeros((h, scale, 1 + wide.shape[1]), dtype=np.uint8)
    rows[:, 0, 1:] = wide  # the first of each group: filter 0 (none), its pixels as they are
    rows[:, 1:, 0] = 2  # the repeats: filter 2 (up), nothing but zeros
    header = struct.pack(">IIBBBBB", w * scale, h * scale, 8, 2, 0, 0, 0)  # 8-bit RGB, not interlaced
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_LEVEL)),
                     _chunk(b"IEND", b"")))


_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
