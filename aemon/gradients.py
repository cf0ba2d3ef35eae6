"""Histograms of gradient orientations: what the strokes and edges of an image look like, cell by cell.

An image (colour averaged to grey) gets its central-difference gradient at every pixel; each
gradient's magnitude is shared between the two nearest of :data:`BINS` orientation bins (0–180°,
linear interpolation, as in Dalal and Triggs' HOG); the magnitudes are summed over a grid of at most
:data:`GRID` × :data:`GRID` cells, and the whole vector is scaled to unit length. Two images whose
features are close have strokes of the same directions in the same places, whatever their
brightness: a digit of another class, a shape turned or moved, a scratch across a clean surface
change them; a little noise or a global change of contrast does not.

:func:`regions` describes each of at most :data:`REGIONS` × :data:`REGIONS` regions by the histograms of
its cell and the cells around it (HOG's blocks), for the ``patches`` score, which compares images region by
region.

Written twice, in numpy (:func:`features`) and in TensorFlow ops (:func:`features_tf`, for a
compiled scoring call; :func:`regions_tf`); ``tests/test_gradients.py`` checks that they agree.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BINS", "BLOCK", "GRID", "MIN_SIDE", "REGIONS", "area_pooling", "features", "features_tf", "grid_of",
           "region_grid", "regions", "regions_tf"]

#: Orientation bins over 0–180° (a stroke's direction, not its sign).
BINS = 9
#: Most cells along each side (a 28×28 digit: 7×7 cells of 4×4 pixels).
GRID = 7
#: Shortest side with a gradient anywhere (a central difference needs a pixel on each side): on smaller
#: images every feature is 0.
MIN_SIDE = 3
#: Most regions along each side for :func:`regions` (a 128×128 image: 8×8 regions of 16×16 pixels).
REGIONS = 8
#: A region is described by the histograms of the ``BLOCK`` × ``BLOCK`` cells around it (as HOG's blocks).
BLOCK = 3
#: Added to a region descriptor's length before it is scaled to unit length (the histograms hold the mean gradient
#: magnitude per pixel, so a block of even gradients of 1 grey level in 255 has a length of about 0.004-0.012): a
#: flat region stays near zero instead of blowing its faint noise up to full length.
FLAT = 0.01


def grid_of(height: int, width: int) -> tuple[int, int, int, int]:
    """``(cells down, cells across, cell height, cell width)``; pixels past the last whole cell are left out."""
    gh, gw = min(GRID, height), min(GRID, width)
    return gh, gw, height // gh, width // gw


def _weights(angle, magnitude, j: int, floor, relu):
    """Share of ``magnitude`` that bin ``j`` gets: 1 at the bin's own angle, falling linearly to 0 one bin away
    (circularly: 179° is next to 0°)."""
    d = angle * (BINS / math.pi) - j
    d = d - BINS * floor(d / BINS + 0.5)
    return relu(1.0 - abs(d)) * magnitude


#: Most grey pixels whose features are computed at once: the temporaries take about 9 times their size
#: (a slice of 2^22 pixels, 16 MB, about 150 MB); 10,000 images of 128×128 at once took 6 GB.
SLICE_PIXELS = 1 << 22


def features(x: np.ndarray) -> np.ndarray:
    """Unit-length gradient-orientation histograms of images ``(N, H, W, C)`` in [0, 1]: ``(N, cells × BINS)``
    float32 (all zeros for an image without any gradient)."""
    rows = max(1, SLICE_PIXELS // max(1, x.shape[1] * x.shape[2]))
    if len(x) > rows:
        return np.concatenate([_features(x[i : i + rows]) for i in range(0, len(x), rows)])
    return _features(x)


def _gradients(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude and orientation (0–π) of the grey image's central-difference gradient, 0 on the border."""
    grey = np.asarray(x, np.float32).mean(axis=-1)
    gy, gx = np.zeros_like(grey), np.zeros_like(grey)  # 0 on the border rows and columns
    gy[:, 1:-1] = grey[:, 2:] - grey[:, :-2]
    gx[:, :, 1:-1] = grey[:, :, 2:] - grey[:, :, :-2]
    return np.sqrt(gx * gx + gy * gy), np.mod(np.arctan2(gy, gx), np.float32(math.pi))


def _features(x: np.ndarray) -> np.ndarray:
    magnitude, angle = _gradients(x)
    n, h, w = magnitude.shape
    gh, gw, ch, cw = grid_of(h, w)
    cells = []
    for j in range(BINS):
        share = _weights(angle, magnitude, j, np.floor, lambda v: np.maximum(v, 0.0))
        cells.append(share[:, : gh * ch, : gw * cw].reshape(n, gh, ch, gw, cw).sum(axis=(2, 4)))
    f = np.stack(cells, axis=-1).reshape(n, -1).astype(np.float32)
    return f / (np.sqrt((f * f).sum(axis=1, keepdims=True)) + np.float32(1e-6))


def area_pooling(n: int, cells: int) -> np.ndarray:
    """``(cells, n)`` float64: row ``i`` averages the ``n`` positions over cell ``i`` of ``cells`` equal cells
    (a position across a cell boundary counts in both, in proportion), so every pixel counts."""
    edges = np.linspace(0.0, n, cells + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n)[None, :]
    return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None) / (hi - lo)


def region_grid(height: int, width: int) -> tuple[int, int]:
    """Regions down and across: :data:`REGIONS` on the longer side, as square as the image allows."""
    longest = max(height, width)
    cells = min(longest, REGIONS)
    return (max(1, min(height, round(height * cells / longest))), max(1, min(width, round(width * cells / longest))))


def regions(x: np.ndarray) -> np.ndarray:
    """Each region's gradient-orientation histograms: images ``(N, H, W, C)`` in [0, 1] → ``(N, g_h, g_w,
    BLOCK² × BINS)`` float32, the histograms (mean magnitude per pixel) of the region's cell and its neighbours
    (edge cells repeated), scaled to about unit length (see :data:`FLAT`). Colour images get 3 more values: the
    region's mean colour less its brightness (each channel minus the mean of the three), which the gradients of
    the grey image cannot see."""
    rows = max(1, SLICE_PIXELS // max(1, x.shape[1] * x.shape[2]))
    if len(x) > rows:
        return np.concatenate([_regions(x[i : i + rows]) for i in range(0, len(x), rows)])
    return _regions(x)


def _regions(x: np.ndarray) -> np.ndarray:
    magnitude, angle = _gradients(x)
    h, w = magnitude.shape[1:]
    gh, gw = region_grid(h, w)
    pool_h, pool_w = area_pooling(h, gh).astype(np.float32), area_pooling(w, gw).astype(np.float32)
    cells = np.stack([pool_h @ _weights(angle, magnitude, j, np.floor, lambda v: np.maximum(v, 0.0)) @ pool_w.T
                      for j in range(BINS)], axis=-1)
    pad = BLOCK // 2
    padded = np.pad(cells, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    block = np.concatenate([padded[:, i : i + gh, j : j + gw] for i in range(BLOCK) for j in range(BLOCK)], axis=-1)
    shape = block / (np.sqrt((block * block).sum(axis=-1, keepdims=True)) + np.float32(FLAT))
    if x.shape[-1] != 3:
        return shape.astype(np.float32)
    colour = np.asarray(x, np.float32) - np.asarray(x, np.float32).mean(axis=-1, keepdims=True)
    tint = np.stack([pool_h @ colour[..., c] @ pool_w.T for c in range(3)], axis=-1)
    return np.concatenate([shape, tint], axis=-1).astype(np.float32)


def _gradients_tf(x):
    """:func:`_gradients` in TensorFlow ops."""
    import tensorflow as tf

    grey = tf.reduce_mean(tf.cast(x, tf.float32), axis=-1)
    h, w = int(grey.shape[1]), int(grey.shape[2])
    # Central differences, 0 on the border rows and columns (and everywhere along a side under 3 pixels).
    gy = tf.pad(grey[:, 2:] - grey[:, :-2], [[0, 0], [1, 1], [0, 0]]) if h >= 3 else tf.zeros_like(grey)
    gx = tf.pad(grey[:, :, 2:] - grey[:, :, :-2], [[0, 0], [0, 0], [1, 1]]) if w >= 3 else tf.zeros_like(grey)
    return tf.sqrt(gx * gx + gy * gy), tf.math.floormod(tf.atan2(gy, gx), math.pi)


def features_tf(x):
    """:func:`features` in TensorFlow ops (float32), for use inside a compiled call."""
    import tensorflow as tf

    magnitude, angle = _gradients_tf(x)
    h, w = int(magnitude.shape[1]), int(magnitude.shape[2])
    gh, gw, ch, cw = grid_of(h, w)
    cells = []
    for j in range(BINS):
        share = _weights(angle, magnitude, j, tf.floor, tf.nn.relu)
        cropped = tf.reshape(share[:, : gh * ch, : gw * cw], [-1, gh, ch, gw, cw])
        cells.append(tf.reduce_sum(cropped, axis=[2, 4]))
    f = tf.reshape(tf.stack(cells, axis=-1), [-1, gh * gw * BINS])
    return f / (tf.sqrt(tf.reduce_sum(f * f, axis=1, keepdims=True)) + 1e-6)


def regions_tf(x):
    """:func:`regions` in TensorFlow ops (float32), for use inside a compiled call."""
    import tensorflow as tf

    magnitude, angle = _gradients_tf(x)
    h, w = int(magnitude.shape[1]), int(magnitude.shape[2])
    gh, gw = region_grid(h, w)
    pool_h, pool_w = tf.constant(area_pooling(h, gh), tf.float32), tf.constant(area_pooling(w, gw), tf.float32)
    cells = tf.stack([tf.einsum("ih,nhw,jw->nij", pool_h, _weights(angle, magnitude, j, tf.floor, tf.nn.relu), pool_w)
                      for j in range(BINS)], axis=-1)  # one bin at a time: (N, H, W, BINS) at once took 2.4 GB
    pad = BLOCK // 2
    rows = tf.concat([cells[:, :1]] * pad + [cells] + [cells[:, -1:]] * pad, axis=1)  # edge cells repeated
    padded = tf.concat([rows[:, :, :1]] * pad + [rows] + [rows[:, :, -1:]] * pad, axis=2)
    block = tf.concat([padded[:, i : i + gh, j : j + gw] for i in range(BLOCK) for j in range(BLOCK)], axis=-1)
    shape = block / (tf.sqrt(tf.reduce_sum(block * block, axis=-1, keepdims=True)) + FLAT)
    if int(x.shape[-1]) != 3:
        return shape
    colour = tf.cast(x, tf.float32) - tf.reduce_mean(tf.cast(x, tf.float32), axis=-1, keepdims=True)
    return tf.concat([shape, tf.einsum("ih,nhwc,jw->nijc", pool_h, colour, pool_w)], axis=-1)
