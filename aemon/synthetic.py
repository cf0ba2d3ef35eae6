"""Synthetic anomalies made from normal images, for choosing a model without real anomalies.

Each family damages one image ``(H, W, C)`` in [0, 1] in a way that real defects often look like,
with sizes relative to the image side, so the same families serve 28-pixel digits and 300-pixel
camera frames. None of them was fitted to a particular data set. The two image operations they need
(a Gaussian blur and bilinear resampling) are written here with numpy, as scipy.ndimage defines them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["FAMILIES", "damage", "families_for"]


def _cutpaste(img: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A patch of another normal image, 8–22 % of the side, possibly flipped, pasted elsewhere."""
    h, w = img.shape[:2]
    ph = max(1, int(rng.uniform(0.08, 0.22) * h))
    pw = max(1, min(w - 1, int(ph * rng.uniform(0.5, 1.5) * w / h)))
    y0, x0 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = other[y0:y0 + ph, x0:x0 + pw]
    if rng.random() < 0.5:
        patch = patch[::-1]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    y1, x1 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    out = img.copy()
    out[y1:y1 + ph, x1:x1 + pw] = patch
    return out


def _gaussian(img: np.ndarray, sigma: float) -> np.ndarray:
    """``img`` blurred over its first two axes, edges mirrored (scipy.ndimage.gaussian_filter, truncate 4)."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(img, np.float64)
    for axis in (0, 1):
        out = np.moveaxis(out, axis, 0)
        size = out.shape[0]
        padded = np.pad(out, [(radius, radius)] + [(0, 0)] * (out.ndim - 1), mode="symmetric")
        blurred = kernel[0] * padded[:size]
        for i in range(1, len(kernel)):
            blurred += kernel[i] * padded[i:i + size]
        out = np.moveaxis(blurred, 0, axis)
    return out.astype(np.float32)


def _resample(img: np.ndarray, ys: np.ndarray, xs: np.ndarray, fill: float | None = None) -> np.ndarray:
    """``img`` ``(H, W, C)`` read bilinearly at positions ``ys, xs``: outside it, ``fill``, or mirrored if None."""
    h, w = img.shape[:2]
    if fill is None:
        ys, xs = _mirrored(ys, h), _mirrored(xs, w)
        outside = None
    else:
        outside = (ys < 0) | (ys > h - 1) | (xs < 0) | (xs > w - 1)
    ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
    y0, x0 = np.minimum(ys.astype(int), h - 2).clip(0), np.minimum(xs.astype(int), w - 2).clip(0)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    out = ((img[y0, x0] * (1 - fx) + img[y0, x1] * fx) * (1 - fy)
           + (img[y1, x0] * (1 - fx) + img[y1, x1] * fx) * fy)
    if outside is not None:
        out[outside] = fill
    return out.astype(np.float32)


def _mirrored(c: np.ndarray, n: int) -> np.ndarray:
    """Positions outside [-0.5, n - 0.5] folded back in, the edge pixel repeated (half-sample symmetric)."""
    c = np.mod(c + 0.5, 2 * n)
    return np.where(c >= n, 2 * n - c, c) - 0.5


def _grid(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    return np.mgrid[0:h, 0:w].astype(np.float32)


def _crack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A thin dark polyline of 2–4 segments, 15–50 % of the side long, 35–70 % darker."""
    h, w = img.shape[:2]
    side = min(h, w)
    mask = np.zeros((h, w), np.float32)
    y, x = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    angle, length, segments = rng.uniform(0, np.pi), rng.uniform(0.15, 0.5) * side, int(rng.integers(2, 5))
    for _ in range(segments):
        angle += rng.normal(0, 0.4)
        steps = np.linspace(0, length / segments, int(2 * length / segments) + 2)
        ys = np.clip(y + np.sin(angle) * steps, 0, h - 1)
        xs = np.clip(x + np.cos(angle) * steps, 0, w - 1)
        mask[ys.astype(int), xs.astype(int)] = 1
        y, x = ys[-1], xs[-1]
    mask = _gaussian(mask, rng.uniform(0.7, 1.8) * side / 300 + 0.3)
    mask /= mask.max() + 1e-6
    return img * (1 - rng.uniform(0.35, 0.7) * mask)[..., None]


def _blob(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A soft ellipse, 4–12 % of the side in radius: darker (3 in 4) or brighter."""
    h, w = img.shape[:2]
    yy, xx = _grid(img)
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    ry, rx = rng.uniform(0.04, 0.12, 2) * min(h, w) + 0.5
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    g = np.exp(-0.5 * (u**2 + v**2) ** 1.5)[..., None]
    if rng.random() < 0.75:
        return img * (1 - rng.uniform(0.3, 0.7) * g)
    return img + (1 - img) * rng.uniform(0.3, 0.6) * g


def _stain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A large faint area, 15–35 % of the side in radius, 10–30 % darker (3 in 4) or brighter."""
    h, w = img.shape[:2]
    yy, xx = _grid(img)
    cy, cx = rng.uniform(0, 1) * h, rng.uniform(0, 1) * w
    r = rng.uniform(0.15, 0.35) * min(h, w) + 0.5
    g = np.exp(-0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r)) ** 2)[..., None]
    if rng.random() < 0.75:
        return img * (1 - rng.uniform(0.1, 0.3) * g)
    return img + (1 - img) * rng.uniform(0.1, 0.3) * g


def _tint(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A soft ellipse, 6–18 % of the side in radius, shifted in colour without changing its brightness (the mean
    of its channels, never clipped): a discoloured spot. Colour images only; a grey image is returned unchanged."""
    if img.shape[-1] != 3:
        return img
    h, w = img.shape[:2]
    yy, xx = _grid(img)
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    ry, rx = rng.uniform(0.06, 0.18, 2) * min(h, w) + 0.5
    g = np.exp(-0.5 * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) ** 1.5)[..., None]
    hue = rng.uniform(0, 2 * np.pi)  # a direction across the grey axis: its three parts sum to 0
    chroma = np.cos(hue + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3], np.float32))
    # At each pixel at most the shift that keeps every channel in [0, 1]: clipping would change the brightness
    # (a black or a saturated pixel cannot be recoloured at the same brightness, and is left as it is).
    with np.errstate(divide="ignore", invalid="ignore"):
        room = np.where(chroma > 0, (1.0 - img) / chroma, np.where(chroma < 0, -img / chroma, np.inf)).min(axis=-1)
    return img + np.minimum(rng.uniform(0.2, 0.4) * g[..., 0], np.maximum(room, 0.0))[..., None] * chroma


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A square of 10–25 % of the side blurred (lost focus, smudge)."""
    h, w = img.shape[:2]
    side = min(h, w)
    s = min(side, max(2, int(rng.uniform(0.1, 0.25) * side)))
    y0, x0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
    sigma = rng.uniform(2.5, 5) * side / 300 + 0.5
    blurred = _gaussian(img, sigma)
    mask = np.zeros((h, w), np.float32)
    mask[y0:y0 + s, x0:x0 + s] = 1
    mask = _gaussian(mask, max(0.5, 2 * side / 300))[..., None]
    return img * (1 - mask) + blurred * mask


def _warp(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A local bend: pixels within 6–14 % of the side of a point pushed in one direction."""
    h, w = img.shape[:2]
    yy, xx = _grid(img)
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    r = rng.uniform(0.06, 0.14) * min(h, w) + 0.5
    g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    amp, angle = rng.uniform(0.4, 0.8) * r, rng.uniform(0, 2 * np.pi)
    return _resample(img, yy + amp * g * np.sin(angle), xx + amp * g * np.cos(angle))


def _geometry(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The whole image rotated (10–30°), shrunk (to 60–85 %) or shifted (8–20 % of the side)."""
    h, w = img.shape[:2]
    yy, xx = _grid(img)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    kind = rng.integers(0, 3)
    if kind == 0:
        a = np.deg2rad(rng.uniform(10, 30)) * rng.choice([-1, 1])
        sy = cy + (yy - cy) * np.cos(a) - (xx - cx) * np.sin(a)
        sx = cx + (yy - cy) * np.sin(a) + (xx - cx) * np.cos(a)
    elif kind == 1:
        f = rng.uniform(0.6, 0.85)
        sy, sx = cy + (yy - cy) / f, cx + (xx - cx) / f
    else:
        d = rng.uniform(0.08, 0.2, 2) * np.array([h, w]) * rng.choice([-1, 1], 2)
        sy, sx = yy - d[0], xx - d[1]
    fill = float(np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])))
    return _resample(img, sy, sx, fill)


#: Damage families by name.
FAMILIES: dict[str, Callable[..., np.ndarray]] = {
    "cutpaste": _cutpaste,
    "crack": _crack,
    "blob": _blob,
    "stain": _stain,
    "tint": _tint,
    "blur": _blur,
    "warp": _warp,
    "geometry": _geometry,
}


#: Families that change only colour: left out for grey images.
COLOUR_ONLY = frozenset({"tint"})


def families_for(channels: int) -> list[str]:
    """The families that damage images of ``channels`` channels (the colour-only ones need 3)."""
    return [name for name in FAMILIES if channels == 3 or name not in COLOUR_ONLY]


#: Smallest change, somewhere in the image, that counts as damage: a family drawn again until it makes one
#: (a dark crack on a black background, or a blur of an empty corner, changes nothing and is no anomaly).
VISIBLE = 0.1
#: Draws of one family for one image before its last draw is kept whatever it changed.
MAX_DRAWS = 30  # 10 left a crack and a blur that missed the thin stroke of a "1" unchanged


def damage(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One damaged copy of every image ``x`` ``(N, H, W, C)`` per family of :func:`families_for` its channels,
    each visibly changed where it can be.

    Returns:
        The damaged images ``(N × families, H, W, C)`` float32 in [0, 1], and each one's family index (in
        :data:`FAMILIES`).
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32)
    used = families_for(x.shape[-1])
    out, family = [], []
    n = len(x)
    for i in range(n):
        for k, (name, fn) in enumerate(FAMILIES.items()):
            if name not in used:
                continue
            for _ in range(MAX_DRAWS):
                if name == "cutpaste":
                    other = x[(i + 1 + int(rng.integers(0, max(1, n - 1)))) % n] if n > 1 else x[i][::-1, ::-1]
                    damaged = np.clip(fn(x[i], other, rng), 0.0, 1.0)
                else:
                    damaged = np.clip(fn(x[i], rng), 0.0, 1.0)
                if np.abs(damaged - x[i]).max() >= VISIBLE:
                    break
            out.append(damaged)
            family.append(k)
    return np.stack(out).astype(np.float32), np.array(family)
