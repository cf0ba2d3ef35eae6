"""Anomaly maps: where an image differs from its reconstruction, drawn over the image as a PNG.

The colour scale is the same for every image and every bundle, so two maps can be compared: a
pixel is tinted red in proportion to the absolute difference between the image and its
reconstruction (pixels in [0, 1]), from none at 0 to full at :data:`FULL_SCALE` or more. Small
images are enlarged (nearest neighbour) to at least :data:`MIN_SIDE` pixels so the map is legible.
"""

from __future__ import annotations

import io
import math

import numpy as np

__all__ = ["FULL_SCALE", "MIN_SIDE", "MAPS_MODES", "difference", "render"]

#: Absolute pixel difference drawn at full colour.
FULL_SCALE = 0.5
#: Shortest side of a drawn map, in pixels.
MIN_SIDE = 128
#: ``AEMON_MAPS`` values: which items get a map.
MAPS_MODES = ("anomaly", "all", "off")
_TINT = np.array([1.0, 0.1, 0.0], dtype=np.float32)  # red with a touch of green: visible on grey


def difference(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Per-pixel absolute difference ``(N, H, W)`` of images and reconstructions ``(N, H, W, C)``."""
    return np.abs(x.astype(np.float32) - recon.astype(np.float32)).mean(axis=-1)


def render(image: np.ndarray, diff: np.ndarray) -> bytes:
    """The map of one image as PNG bytes.

    Args:
        image: The model input ``(H, W, C)`` in [0, 1].
        diff: Its :func:`difference` ``(H, W)``.
    """
    from PIL import Image

    gray = image.astype(np.float32).mean(axis=-1)
    alpha = np.clip(diff / FULL_SCALE, 0.0, 1.0)[..., None] * 0.85
    rgb = gray[..., None] * (1.0 - alpha) + _TINT * alpha
    pixels = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    scale = max(1, math.ceil(MIN_SIDE / max(1, min(pixels.shape[:2]))))
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
