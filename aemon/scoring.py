"""Score functions, and one compiled model call per batch with the score inside it.

``model.predict`` costs tens of milliseconds per call whatever the batch; a ``tf.function``
traced once over a ``(None, H, W, C)`` signature costs about a millisecond, so one scorer
serves 1 image or 10,000 at full speed. Large inputs are cut into chunks of ``chunk``.

Two kinds of score function:

* **global** (``mse``, ``bce``, ``topk``): a function of the image and its reconstruction.
* **local** (``zmax``, ``zmax+mean``): the squared error map is pooled to a grid of at most
  :data:`GRID` cells a side and smoothed (Gaussian, σ = 1/32 of the grid side), then compared cell by
  cell with the same map of the normal images the model was fitted on (their mean and standard
  deviation at that cell: the *state*, stored in the bundle). The score is the largest z-score:
  a small defect anywhere counts, and places that are always hard to reconstruct (edges, busbars,
  fine texture) do not. ``zmax+mean`` adds the same score of the distance to the mean normal image,
  which catches large faint changes that a reconstruction follows.
* **nearest**: the distance of the image's gradient-orientation histograms (:mod:`aemon.gradients`) to
  those of the closest normal image the model was fitted on (kept in the state). It does not use the
  reconstruction; its map shows the cells where the image differs from that closest normal image.
* **patches**: the same comparison region by region (:func:`aemon.gradients.regions`), each region against
  the same region of every remembered normal image; the score is the farthest region's distance.
* **sums** (``zmax+nearest``, ``zmax+patches``, ...): a local score plus a score of the image alone, each
  standardised on the fitted images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from aemon.gradients import BINS, MIN_SIDE, area_pooling, features, features_tf, grid_of, regions, regions_tf
from aemon.models import seeded_subset

__all__ = ["GRID", "SCORE_FUNCTIONS", "ScoreFunction", "TOPK_SHARE", "fit_state", "local_operators",
           "reconstruction_error", "Scorer"]

#: Share of pixels whose squared errors ``topk`` averages (the worst 5 %: 40 of 784).
TOPK_SHARE = 0.05
#: Most cells a side of the grid that local scores pool the error map to.
GRID = 64
#: Gaussian smoothing of the pooled map, as a share of the grid side (2 cells on a 64 grid).
SIGMA_SHARE = 1 / 32
_EPS = 1e-7

State = dict[str, np.ndarray]


def _topk(pixels: int) -> int:
    return max(1, math.ceil(TOPK_SHARE * pixels))


def _flat(a):
    return a.reshape(len(a), -1) if isinstance(a, np.ndarray) else tf.reshape(a, (tf.shape(a)[0], -1))


# Global scores, each twice: numpy (reference, evaluation) and TensorFlow (inside the compiled
# call). Inputs are images (N, H, W, C) float32 and the state (unused here); a parity test checks
# every pair.
def _mse_np(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    return np.mean(np.square(_flat(x) - _flat(r)), axis=1, dtype=np.float64)


def _mse_tf(x, r, state):
    return tf.reduce_mean(tf.square(_flat(x) - _flat(r)), axis=1)


def _bce_np(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    x, r = _flat(x), np.clip(_flat(r), _EPS, 1 - _EPS)
    return -np.mean(x * np.log(r) + (1 - x) * np.log1p(-r), axis=1, dtype=np.float64)


def _bce_tf(x, r, state):
    x, r = _flat(x), tf.clip_by_value(_flat(r), _EPS, 1 - _EPS)
    return -tf.reduce_mean(x * tf.math.log(r) + (1 - x) * tf.math.log1p(-r), axis=1)


def _topk_np(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    err = np.square(_flat(x) - _flat(r))
    pixels = err.shape[1]
    k = _topk(pixels)
    return np.mean(np.partition(err, pixels - k, axis=1)[:, pixels - k:], axis=1, dtype=np.float64)


def _topk_tf(x, r, state):
    err = tf.square(_flat(x) - _flat(r))
    return tf.reduce_mean(tf.math.top_k(err, k=_topk(math.prod(x.shape[1:])), sorted=False).values, axis=1)


# Local scores.
def local_operators(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Matrices ``A_h (g_h, H)`` and ``A_w (g_w, W)`` with ``A_h @ E @ A_wᵀ`` = ``E`` pooled and smoothed.

    Area pooling to square cells, at most :data:`GRID` a side on the longer side, then a Gaussian of
    σ = :data:`SIGMA_SHARE` × that side in cells, the same in pixels on both axes, its weights
    renormalised at the borders (no dark frame).
    """
    longest = max(height, width)
    cells = min(longest, GRID)
    sigma = max(cells * SIGMA_SHARE, 0.5)

    def one(n: int) -> np.ndarray:
        g = max(1, min(n, round(n * cells / longest)))
        pool = area_pooling(n, g)
        i = np.arange(g)
        gauss = np.exp(-np.square(i[:, None] - i[None, :]) / (2 * sigma * sigma))
        gauss /= gauss.sum(axis=1, keepdims=True)
        return (gauss @ pool).astype(np.float32)

    return one(height), one(width)


def _smoothed_np(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    err = np.square(x.astype(np.float32) - r.astype(np.float32)).mean(axis=-1)
    return state["a_h"] @ err @ state["a_w"].T


def _smoothed_tf(x, r, state):
    err = tf.reduce_mean(tf.square(x - r), axis=-1)
    return tf.einsum("ih,nhw,jw->nij", state["a_h"], err, state["a_w"])


def _z_stats(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell mean and (floored) standard deviation of smoothed error maps ``(N, g_h, g_w)``."""
    mean = maps.mean(axis=0, dtype=np.float64)
    sd = maps.std(axis=0, dtype=np.float64)
    floor = max(1e-3 * float(maps.std(dtype=np.float64)), 1e-8)
    return mean.astype(np.float32), (sd + floor).astype(np.float32)


def _z_np(x: np.ndarray, r: np.ndarray, state: State, key: str = "") -> np.ndarray:
    return (_smoothed_np(x, r, state) - state["m" + key]) / state["s" + key]


def _zmax_np(x: np.ndarray, r: np.ndarray, state: State, key: str = "") -> np.ndarray:
    z = _z_np(x, r, state, key)
    return z.reshape(len(z), -1).max(axis=1).astype(np.float64)


def _zmax_tf(x, r, state, key: str = ""):
    z = (_smoothed_tf(x, r, state) - state["m" + key]) / state["s" + key]
    return tf.reduce_max(tf.reshape(z, (tf.shape(z)[0], -1)), axis=1)


def _zmax_fit(x: np.ndarray, r: np.ndarray) -> State:
    a_h, a_w = local_operators(x.shape[1], x.shape[2])
    state = {"a_h": a_h, "a_w": a_w}
    state["m"], state["s"] = _z_stats(_smoothed_np(x, r, state))
    return state


def _terms(*scores: np.ndarray) -> np.ndarray:
    """Mean and floored standard deviation of each term's scores on the normal images, for standardising.

    The floor (a thousandth of the mean's size, at least 1e-6) keeps a term that barely varies (constant
    images) from turning float32 rounding into large scores.
    """
    out = []
    for s in scores:
        mean = float(np.mean(s))
        out += [mean, max(float(np.std(s)), 1e-3 * abs(mean), 1e-6)]
    return np.array(out, np.float32)


def _zmean_np(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    mean = np.broadcast_to(state["mean_image"], x.shape)
    t = state["terms"]
    return (_zmax_np(x, r, state) - t[0]) / t[1] + (_zmax_np(x, mean, state, "_mean") - t[2]) / t[3]


def _zmean_where(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    t = state["terms"]
    mean = np.broadcast_to(state["mean_image"], x.shape)
    return (_z_np(x, r, state) - t[0]) / t[1] + (_z_np(x, mean, state, "_mean") - t[2]) / t[3]


def _zmean_tf(x, r, state):
    mean = tf.broadcast_to(state["mean_image"], tf.shape(x))
    t = state["terms"]
    return (_zmax_tf(x, r, state) - t[0]) / t[1] + (_zmax_tf(x, mean, state, "_mean") - t[2]) / t[3]


def _zmean_fit(x: np.ndarray, r: np.ndarray) -> State:
    state = _zmax_fit(x, r)
    state["mean_image"] = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    mean = np.broadcast_to(state["mean_image"], x.shape)
    state["m_mean"], state["s_mean"] = _z_stats(_smoothed_np(x, mean, state))
    own, far = _zmax_np(x, r, state), _zmax_np(x, mean, state, "_mean")
    state["terms"] = _terms(own, far)
    return state


# The "shape" term: where the image's intensity sits, how much of it and how spread, as a Gaussian
# over 6 moments fitted on the normal images. Reconstruction errors miss a digit shrunk to half its
# size (the autoencoder reconstructs small digits well); these moments do not. Both versions build
# them from five weighted sums over coordinates centred on the image (two of them from row and column
# sums), one pass over the pixels each instead of one per moment.
def _moments_np(x: np.ndarray) -> np.ndarray:
    img = x.mean(axis=-1, dtype=np.float64)
    h, w = img.shape[1:]
    yc, xc = np.arange(h) / h - 0.5, np.arange(w) / w - 0.5
    rows, cols = img.sum(axis=2), img.sum(axis=1)
    sums = (rows.sum(axis=1), rows @ yc, cols @ xc, rows @ (yc * yc), cols @ (xc * xc),
            np.einsum("nhw,h,w->n", img, yc, xc))
    return np.stack(_moments_of(*sums, h, w, np), axis=1)


def _moments_tf(x):
    img = tf.reduce_mean(x, axis=-1)
    h, w = x.shape[1], x.shape[2]
    yc, xc = tf.range(h, dtype=tf.float32) / h - 0.5, tf.range(w, dtype=tf.float32) / w - 0.5
    rows, cols = tf.reduce_sum(img, axis=2), tf.reduce_sum(img, axis=1)
    sums = (tf.reduce_sum(rows, axis=1), tf.linalg.matvec(rows, yc), tf.linalg.matvec(cols, xc),
            tf.linalg.matvec(rows, yc * yc), tf.linalg.matvec(cols, xc * xc),
            tf.linalg.matvec(tf.linalg.matvec(img, xc), yc))
    return tf.stack(_moments_of(*sums, h, w, tf.math), axis=1)


def _moments_of(s, sy, sx, syy, sxx, sxy, h: int, w: int, ops) -> list:
    """Mass, centre, spread and correlation from the sums of the intensity times 1, y, x, y², x², y·x
    (coordinates in [-0.5, 0.5)); ``ops`` is numpy or ``tf.math``."""
    mass = s + 1e-3
    cy, cx = (sy + 0.5 * s) / mass, (sx + 0.5 * s) / mass
    ey, ex = cy - 0.5, cx - 0.5  # the centre in centred coordinates
    # Never below 0, which float32 rounding could reach for an image with no spread.
    vy = ops.maximum((syy - 2 * ey * sy + ey * ey * s) / mass, 0.0)
    vx = ops.maximum((sxx - 2 * ex * sx + ex * ex * s) / mass, 0.0)
    cov = (sxy - ex * sy - ey * sx + ey * ex * s) / mass
    return [ops.log(mass / (h * w)), cy, cx, 0.5 * ops.log(vy + 1e-6), 0.5 * ops.log(vx + 1e-6),
            cov / ops.sqrt(vy * vx + 1e-9)]


def _shape_np(x: np.ndarray, state: State) -> np.ndarray:
    d = _moments_np(x) - state["shape_mean"]
    return np.einsum("ni,ij,nj->n", d, state["shape_precision"].astype(np.float64), d)


def _shape_tf(x, state):
    d = _moments_tf(x) - state["shape_mean"]
    return tf.einsum("ni,ij,nj->n", d, state["shape_precision"], d)


def _bce_shape_np(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    t = state["terms"].astype(np.float64)
    return (_bce_np(x, r, state) - t[0]) / t[1] + (_shape_np(x, state) - t[2]) / t[3]


def _bce_shape_tf(x, r, state):
    t = state["terms"]
    return (_bce_tf(x, r, state) - t[0]) / t[1] + (_shape_tf(x, state) - t[2]) / t[3]


def _bce_shape_fit(x: np.ndarray, r: np.ndarray) -> State:
    moments = _moments_np(x)
    cov = np.cov(moments.T) + 1e-6 * np.eye(moments.shape[1])
    state = {"shape_mean": moments.mean(axis=0).astype(np.float32),
             "shape_precision": np.linalg.inv(cov).astype(np.float32)}
    own, shape = _bce_np(x, r, state), _shape_np(x, state)
    state["terms"] = _terms(own, shape)
    return state


@dataclass(frozen=True)
class ScoreFunction:
    """One per-image score: the same formula in numpy and in TensorFlow ops.

    Both take images ``(N, H, W, C)``, reconstructions of the same shape and the state that
    ``fit`` made from the normal images the model was fitted on (empty for global scores).
    """

    #: What it measures (shown by ``aemon train --help``).
    summary: str
    numpy: Callable[[np.ndarray, np.ndarray, State], np.ndarray]
    tf: Callable
    #: Learns the state from fitted normal images and their reconstructions; None: stateless.
    fit: Callable[[np.ndarray, np.ndarray], State] | None = field(default=None)
    #: Local scores: the map ``(N, g_h, g_w)`` whose largest value (about) is the score, for anomaly maps.
    where: Callable[[np.ndarray, np.ndarray, State], np.ndarray] | None = field(default=None)
    #: False for a score of the image alone (the same whatever the model): ranked once, not per model.
    uses_reconstruction: bool = True
    #: Shortest image side (pixels) on which the score can tell images apart.
    min_side: int = 1


# "nearest": how far the image's strokes and edges are from those of the closest normal image the model
# was fitted on (gradient-orientation histograms, :mod:`aemon.gradients`; the state is theirs). A digit of
# another class, or a shape turned, moved or drawn otherwise, is far from every normal image even where an
# autoencoder reconstructs it well. The reconstruction is not used by the score; the anomaly map is.
#: Most normal images whose features a ``nearest`` state keeps (a seeded subset beyond): 10,000 × 441
#: float32 values, 18 MB.
MAX_NEIGHBOURS = 10_000
#: Images compared with the neighbours at once (numpy): a 2,000 × 10,000 similarity matrix is 80 MB.
_NEAREST_CHUNK = 2000


def _distance(similarity):
    """The distance between unit vectors of this cosine similarity (numpy or TF), never NaN from rounding."""
    lib = np if isinstance(similarity, np.ndarray) else tf
    return lib.sqrt(lib.maximum(2.0 - 2.0 * similarity, 0.0))


def _similarities_np(x: np.ndarray, state: State) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's features, its highest cosine similarity to the normal images', and which one that is."""
    f = features(x)
    best, which = np.empty(len(f), np.float32), np.empty(len(f), np.int64)
    for i in range(0, len(f), _NEAREST_CHUNK):
        sims = f[i : i + _NEAREST_CHUNK] @ state["neighbours"].T
        which[i : i + _NEAREST_CHUNK] = sims.argmax(axis=1)
        best[i : i + _NEAREST_CHUNK] = sims[np.arange(len(sims)), which[i : i + _NEAREST_CHUNK]]
    return f, best, which


def _nearest_np(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    _, best, _ = _similarities_np(x, state)
    return _distance(best.astype(np.float64))


def _nearest_tf(x, r, state):
    return _distance(tf.reduce_max(tf.matmul(features_tf(x), state["neighbours"], transpose_b=True), axis=1))


def _nearest_where(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    """Per cell, how far the image's histograms are from its nearest normal image's, scaled so that the
    largest cell is the score (as a local score's map): an image under the threshold is nowhere at full colour."""
    f, best, which = _similarities_np(x, state)
    gh, gw, _, _ = grid_of(x.shape[1], x.shape[2])
    cells = np.sqrt(np.square((f - state["neighbours"][which]).reshape(len(f), gh, gw, BINS)).sum(axis=-1))
    score = _distance(best).astype(np.float32)
    largest = cells.reshape(len(cells), -1).max(axis=1)
    return cells * (score / np.maximum(largest, np.float32(1e-12)))[:, None, None]


def _nearest_fit(x: np.ndarray, r: np.ndarray) -> State:
    return {"neighbours": features(seeded_subset(x, MAX_NEIGHBOURS))}


def _left_out_nearest(neighbours: np.ndarray) -> np.ndarray:
    """Each remembered image's ``nearest`` score against the others (its own distance, 0, left out)."""
    best = np.empty(len(neighbours), np.float64)
    for i in range(0, len(neighbours), _NEAREST_CHUNK):
        sims = neighbours[i : i + _NEAREST_CHUNK] @ neighbours.T
        sims[np.arange(len(sims)), np.arange(i, i + len(sims))] = -np.inf
        best[i : i + _NEAREST_CHUNK] = sims.max(axis=1)
    return _distance(best)


# "patches": how far each region's gradient-orientation histograms (:func:`aemon.gradients.regions`) are from
# those of the closest normal image at the same region; the score is the farthest region. It reads the image
# alone, as ``nearest``, but place by place: a crack or a stain in one region counts fully, wherever the rest of
# the image matches which normal image.
#: Most normal images whose regions a ``patches`` state keeps (a seeded subset beyond): 1,000 × 64 regions × 81
#: values, 21 MB; each image scored is compared with all of them, region by region.
MAX_PATCH_NEIGHBOURS = 1_000
#: Images compared at once (numpy): 256 × 1,000 similarities per region.
_PATCH_CHUNK = 256


def _by_region(regions_of: np.ndarray) -> np.ndarray:
    """``(N, g_h, g_w, D)`` → ``(g_h × g_w, N, D)``: one matrix per region."""
    n, gh, gw, d = regions_of.shape
    return np.ascontiguousarray(regions_of.reshape(n, gh * gw, d).transpose(1, 0, 2))


def _closest_regions(f: np.ndarray, ref: np.ndarray, skip: int | None = None) -> np.ndarray:
    """For regions ``f (N, g_h, g_w, D)``, the distance of each to the closest at the same place among ``ref``
    ``(K, g_h, g_w, D)``: ``(N, g_h, g_w)``. With ``skip``, ``f`` is ``ref[skip : skip + N]`` and each image's
    own regions are left out."""
    own, others = _by_region(f), _by_region(ref)
    others_sq = np.square(others).sum(axis=-1)
    out = np.empty(own.shape[:2], np.float32)
    for p in range(len(own)):
        d2 = others_sq[p][None, :] - 2.0 * (own[p] @ others[p].T)  # the squared distance, less |own|²
        if skip is not None:
            d2[np.arange(len(d2)), np.arange(skip, skip + len(d2))] = np.inf
        # The distance to the closest, computed again exactly: the expanded form leaves rounding noise that the
        # square root would blow up to ~1e-3 for an exact match.
        out[p] = np.sqrt(np.square(own[p] - others[p][d2.argmin(axis=1)]).sum(axis=1))
    return out.T.reshape(f.shape[:3])


def _region_distances(x: np.ndarray, state: State) -> np.ndarray:
    f = regions(x)
    return np.concatenate([_closest_regions(f[i : i + _PATCH_CHUNK], state["regions"])
                           for i in range(0, len(f), _PATCH_CHUNK)] or [np.zeros((0, *f.shape[1:3]), np.float32)])


def _patches_np(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    return _region_distances(x, state).max(axis=(1, 2)).astype(np.float64)


def _patches_tf(x, r, state):
    f = regions_tf(x)
    regions_count, d = int(f.shape[1]) * int(f.shape[2]), int(f.shape[3])
    own = tf.transpose(tf.reshape(f, [-1, regions_count, d]), [1, 0, 2])  # (regions, N, D)
    others = tf.transpose(tf.reshape(state["regions"], [-1, regions_count, d]), [1, 0, 2])  # (regions, K, D)
    d2 = tf.reduce_sum(others * others, axis=2)[:, None, :] - 2.0 * tf.matmul(own, others, transpose_b=True)
    closest = tf.gather(others, tf.argmin(d2, axis=2), batch_dims=1)  # as the numpy form: the exact distance
    return tf.reduce_max(tf.sqrt(tf.reduce_sum(tf.square(own - closest), axis=2)), axis=0)


def _patches_where(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
    return _region_distances(x, state)


def _patches_fit(x: np.ndarray, r: np.ndarray) -> State:
    return {"regions": regions(seeded_subset(x, MAX_PATCH_NEIGHBOURS))}


def _left_out_patches(ref: np.ndarray) -> np.ndarray:
    """Each remembered image's ``patches`` score against the others."""
    if len(ref) < 2:
        return np.zeros(len(ref))
    return np.concatenate([_closest_regions(ref[i : i + _PATCH_CHUNK], ref, skip=i).max(axis=(1, 2))
                           for i in range(0, len(ref), _PATCH_CHUNK)]).astype(np.float64)


@dataclass(frozen=True)
class _ImageTerm:
    """A score of the image alone, to be added to a local score: its name, its pair, its state and its scores
    on the remembered images with each one left out of its own comparison."""

    name: str
    numpy: Callable
    tf: Callable
    fit: Callable[[np.ndarray, np.ndarray], State]
    left_out: Callable[[State], np.ndarray]


_NEAREST = _ImageTerm("nearest", _nearest_np, _nearest_tf, _nearest_fit, lambda s: _left_out_nearest(s["neighbours"]))
_PATCHES = _ImageTerm("patches", _patches_np, _patches_tf, _patches_fit, lambda s: _left_out_patches(s["regions"]))


def _plus(base: ScoreFunction, term: _ImageTerm) -> ScoreFunction:
    """``base`` (a local score) plus ``term``, each standardised on the fitted images (``term`` by each
    image's score against the others): a defect of the surface and a change of shape both count."""
    key = f"terms_{term.name}"

    def numpy(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
        t = state[key]
        return (base.numpy(x, r, state) - t[0]) / t[1] + (term.numpy(x, r, state) - t[2]) / t[3]

    def tf_score(x, r, state):
        t = state[key]
        return (base.tf(x, r, state) - t[0]) / t[1] + (term.tf(x, r, state) - t[2]) / t[3]

    def fit(x: np.ndarray, r: np.ndarray) -> State:
        state = {**base.fit(x, r), **term.fit(x, r)}
        state[key] = _terms(base.numpy(x, r, state), term.left_out(state))
        return state

    def where(x: np.ndarray, r: np.ndarray, state: State) -> np.ndarray:
        """The base score's map on the sum's scale: its largest value is (about, exactly for zmax) the score."""
        t = state[key]
        image_term = (term.numpy(x, r, state) - t[2]) / t[3]
        return (base.where(x, r, state) - t[0]) / t[1] + image_term[:, None, None].astype(np.float32)

    return ScoreFunction(f"{base.summary}, plus {term.name} (each standardised on the normal images)",
                         numpy, tf_score, fit, where, min_side=MIN_SIDE)


#: Score functions by the name stored in a bundle. To add one, write its pair (and ``fit`` if it
#: needs state) above and add a row here.
SCORE_FUNCTIONS: dict[str, ScoreFunction] = {
    "mse": ScoreFunction("mean squared pixel error", _mse_np, _mse_tf),
    "bce": ScoreFunction("mean binary cross-entropy of the reconstruction against the input", _bce_np, _bce_tf),
    "topk": ScoreFunction(f"mean squared error of the worst {TOPK_SHARE:.0%} of the pixels", _topk_np, _topk_tf),
    "zmax": ScoreFunction("largest z-score of the smoothed error map against the normal images' error at each place "
                          "(small local defects)", _zmax_np, _zmax_tf, _zmax_fit, _z_np),
    "zmax+mean": ScoreFunction("zmax plus the same score of the distance to the mean normal image (also large faint "
                               "changes)", _zmean_np, _zmean_tf, _zmean_fit, _zmean_where),
    "bce+shape": ScoreFunction("bce plus how unusual the image's amount, place and spread of intensity are (a digit "
                               "shrunk, moved or turned)", _bce_shape_np, _bce_shape_tf, _bce_shape_fit),
    "nearest": ScoreFunction("distance of the image's gradient-orientation histograms to the nearest normal "
                             "training image's (shapes and strokes: another class, a part turned or missing)",
                             _nearest_np, _nearest_tf, _nearest_fit, _nearest_where, uses_reconstruction=False,
                             min_side=MIN_SIDE),
    "patches": ScoreFunction("distance of each region's gradient-orientation histograms to the closest normal "
                             "training image's at the same place, the farthest region (small local defects, "
                             "without a model)", _patches_np, _patches_tf, _patches_fit, _patches_where,
                             uses_reconstruction=False, min_side=MIN_SIDE),
}
for _base in ("zmax", "zmax+mean"):
    for _term in (_NEAREST, _PATCHES):
        SCORE_FUNCTIONS[f"{_base}+{_term.name}"] = _plus(SCORE_FUNCTIONS[_base], _term)


def lookup(kind: str) -> ScoreFunction:
    """The score function named ``kind``.

    Raises:
        ValueError: no such score function, naming the choices.
    """
    try:
        return SCORE_FUNCTIONS[kind]
    except KeyError:
        raise ValueError(f"unknown score function {kind!r}; choose one of {', '.join(SCORE_FUNCTIONS)}") from None


def fit_state(kind: str, x: np.ndarray, recon: np.ndarray) -> State:
    """The state of score function ``kind`` learnt from normal images ``x`` and their reconstructions."""
    fn = lookup(kind)
    return {} if fn.fit is None else fn.fit(np.asarray(x, np.float32), np.asarray(recon, np.float32))


def reconstruction_error(x: np.ndarray, recon: np.ndarray, kind: str = "mse", state: State | None = None) -> np.ndarray:
    """Per-image score (numpy), ``kind`` naming a row of :data:`SCORE_FUNCTIONS`.

    Args:
        x: Inputs, ``(N, H, W, C)`` in [0, 1].
        recon: The model's reconstructions, same shape.
        kind: The score function's name.
        state: What the score function learnt at training (required by local scores).
    """
    fn = lookup(kind)
    if fn.fit is not None and not state:
        raise ValueError(f"the {kind!r} score needs the state learnt at training; it is stored in the bundle")
    x = x.astype(np.float32, copy=False)
    recon = recon.astype(np.float32, copy=False)
    return fn.numpy(x, recon, state or {})


def _tf_error(x, recon, kind: str, state=None):
    """:func:`reconstruction_error` in TensorFlow ops (float32), for use inside a compiled call."""
    return lookup(kind).tf(x, recon, state or {})


class Scorer:
    """Reconstructs and scores images with a compiled call of a Keras model.

    Args:
        model: A Keras autoencoder taking ``(N, H, W, C)`` float32.
        score_fn: Name of the score function (see :data:`SCORE_FUNCTIONS`).
        chunk: Largest batch sent to the model in one call.
        state: The score function's state (see :func:`fit_state`), for local scores.
    """

    def __init__(self, model, score_fn: str = "mse", chunk: int = 1024, state: State | None = None) -> None:
        self.model = model
        self.score_fn = score_fn
        self.chunk = chunk
        self.state = dict(state or {})
        if lookup(score_fn).fit is not None and not self.state:
            raise ValueError(f"the {score_fn!r} score needs the state learnt at training; it is stored in the bundle")
        consts = {k: tf.constant(v, tf.float32) for k, v in self.state.items()}
        shape = tuple(model.input_shape[1:])
        self.input_shape = shape
        spec = tf.TensorSpec(shape=(None, *shape), dtype=tf.float32)
        # autograph=False: no step branches on a tensor, and autograph's rewriting of the Python source
        # was most of a bundle's load time (1.5 of 2.3 s, cProfile).
        self._call = tf.function(lambda x: model(x, training=False), input_signature=[spec], autograph=False)
        # The score is computed in the same compiled call: no reconstruction is copied back.
        self._score_call = tf.function(lambda x: _tf_error(x, model(x, training=False), score_fn, consts),
                                       input_signature=[spec], autograph=False)
        # Trace now, so the first real item does not pay for it.
        self._call(tf.zeros((1, *shape), tf.float32))
        self._score_call(tf.zeros((1, *shape), tf.float32))
        self._encode = None

    def _chunks(self, fn, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) <= self.chunk:
            return fn(x).numpy()
        return np.concatenate([fn(x[i : i + self.chunk]).numpy() for i in range(0, len(x), self.chunk)])

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """The model's reconstructions of ``x`` (float32, same shape)."""
        return self._chunks(self._call, x)

    def where(self, x: np.ndarray, recon: np.ndarray) -> np.ndarray | None:
        """Where a local score finds ``x`` unusual: a map ``(N, g_h, g_w)`` on the score's own scale; None
        for global scores."""
        fn = lookup(self.score_fn)
        return None if fn.where is None else fn.where(x.astype(np.float32), recon.astype(np.float32), self.state)

    def score_of(self, x: np.ndarray, recon: np.ndarray) -> np.ndarray:
        """Per-image score of ``x`` from reconstructions already made (numpy)."""
        return reconstruction_error(x, recon, self.score_fn, self.state)

    @property
    def has_encoder(self) -> bool:
        """Whether the model has a named ``encoder`` sub-model (every aemon architecture does)."""
        return any(layer.name == "encoder" for layer in self.model.layers)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Latent codes of ``x`` from the ``encoder`` sub-model, flattened to ``(N, code size)``.

        Raises:
            ValueError: the model has no ``encoder`` sub-model.
        """
        if self._encode is None:
            if not self.has_encoder:
                raise ValueError("this model has no 'encoder' sub-model")
            encoder = self.model.get_layer("encoder")
            spec = tf.TensorSpec(shape=(None, *self.input_shape), dtype=tf.float32)
            self._encode = tf.function(lambda x: encoder(x, training=False), input_signature=[spec],
                                       autograph=False)
        codes = self._chunks(self._encode, x)
        return codes.reshape(len(codes), -1)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Per-image score of ``x``."""
        if len(x) == 0:
            return np.zeros(0, dtype=np.float64)
        return self._chunks(self._score_call, x).astype(np.float64)
