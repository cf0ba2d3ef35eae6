"""Histograms of gradient orientations: what the strokes and edges of an image look like, cell by cell.

An image (colour averaged to grey) gets its central-difference gradient at every pixel; each
gradient's magnitude is shared between the two nearest of :data:`BINS` orientation bins (0–180°,
linear interpolation, as in Dalal and Triggs' HOG); the magnitudes are summed over a grid of at most
:data:`GRID` × :data:`GRID` cells, and the whole vector is scaled to unit length. Two images whose
features are close have strokes of the same directions in the same places, whatever their
brightness: a digit of another class, a shape turned or moved, a scratch across a clean surface
change them; a little noise or a global change of contrast does not.

Written twice, in numpy (:func:`features`) and in TensorFlow ops (:func:`features_tf`, for a
compiled scoring call); ``tests/test_scoring.py`` checks that they agree.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BINS", "GRID", "features", "features_tf", "grid_of"]

#: Orientation bins over 0–180° (a stroke's direction, not its sign).
BINS = 9
#: Most cells along each side (a 28×28 digit: 7×7 cells of 4×4 pixels).
GRID = 7


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


def _features(x: np.ndarray) -> np.ndarray:
    grey = np.asarray(x, np.float32).mean(axis=-1)
    n, h, w = grey.shape
    gy, gx = np.zeros_like(grey), np.zeros_like(grey)  # 0 on the border rows and columns
    gy[:, 1:-1] = grey[:, 2:] - grey[:, :-2]
    gx[:, :, 1:-1] = grey[:, :, 2:] - grey[:, :, :-2]
    magnitude = np.sqrt(gx * gx + gy * gy)
    angle = np.mod(np.arctan2(gy, gx), np.float32(math.pi))
    gh, gw, ch, cw = grid_of(h, w)
    cells = []
    for j in range(BINS):
        share = _weights(angle, magnitude, j, np.floor, lambda v: np.maximum(v, 0.0))
        cells.append(share[:, : gh * ch, : gw * cw].reshape(n, gh, ch, gw, cw).sum(axis=(2, 4)))
    f = np.stack(cells, axis=-1).reshape(n, -1).astype(np.float32)
    return f / (np.sqrt((f * f).sum(axis=1, keepdims=True)) + np.float32(1e-6))


def features_tf(x):
    """:func:`features` in TensorFlow ops (float32), for use inside a compiled call."""
    import tensorflow as tf

    grey = tf.reduce_mean(tf.cast(x, tf.float32), axis=-1)
    h, w = int(grey.shape[1]), int(grey.shape[2])
    # Central differences, 0 on the border rows and columns (and everywhere along a side under 3 pixels).
    gy = tf.pad(grey[:, 2:] - grey[:, :-2], [[0, 0], [1, 1], [0, 0]]) if h >= 3 else tf.zeros_like(grey)
    gx = tf.pad(grey[:, :, 2:] - grey[:, :, :-2], [[0, 0], [0, 0], [1, 1]]) if w >= 3 else tf.zeros_like(grey)
    magnitude = tf.sqrt(gx * gx + gy * gy)
    angle = tf.math.floormod(tf.atan2(gy, gx), math.pi)
    gh, gw, ch, cw = grid_of(h, w)
    cells = []
    for j in range(BINS):
        share = _weights(angle, magnitude, j, tf.floor, tf.nn.relu)
        cropped = tf.reshape(share[:, : gh * ch, : gw * cw], [-1, gh, ch, gw, cw])
        cells.append(tf.reduce_sum(cropped, axis=[2, 4]))
    f = tf.reshape(tf.stack(cells, axis=-1), [-1, gh * gw * BINS])
    return f / (tf.sqrt(tf.reduce_sum(f * f, axis=1, keepdims=True)) + 1e-6)
