"""The shipped default detector: anomalies of shape, position and scale count, not only of texture and ink."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from aemon.bundle import default_bundle_path, load_bundle


def _shrunk(img: np.ndarray, factor: float) -> np.ndarray:
    small = ndimage.zoom(img, factor, order=1)
    out = np.zeros_like(img)
    top = (img.shape[0] - small.shape[0]) // 2
    left = (img.shape[1] - small.shape[1]) // 2
    out[top:top + small.shape[0], left:left + small.shape[1]] = small
    return out


CHANGES = {
    "shrunk to half": lambda img: _shrunk(img, 0.5),
    "shifted 6 px down and right": lambda img: ndimage.shift(img, (6, 6), order=1),
    "shifted 5 px left": lambda img: ndimage.shift(img, (0, -5), order=1),
    "turned 45 degrees": lambda img: ndimage.rotate(img, 45, reshape=False, order=1),
    "turned -90 degrees": lambda img: ndimage.rotate(img, -90, reshape=False, order=1),
    "turned upside down": lambda img: np.rot90(img, 2),
}


@pytest.fixture(scope="module")
def detector():
    return load_bundle(default_bundle_path("detect"))


@pytest.mark.parametrize("change", CHANGES)
def test_changed_digit_never_more_normal_than_its_original(detector, mnist_digits: np.ndarray, change: str) -> None:
    """All 5,000 shipped real digits: each shrunk or shifted copy scores above its original, and is flagged.

    A turn is judged on the typical digits (scored at or under the median calibration score: a
    slanted digit turned upright may rightly look more normal), 1s excepted (a turned 1 is a
    slanted 1).
    """
    from aemon.sources import sample_mnist

    _, labels = sample_mnist()
    digits = mnist_digits.astype(np.float32) / 255.0
    original = detector.score(digits[..., None])
    if change.startswith("turned"):
        keep = (original <= np.median(detector.meta.calibration.scores)) & (labels != 1)
        digits, original = digits[keep], original[keep]
        assert len(digits) > 2000
    changed = np.clip(np.stack([CHANGES[change](img) for img in digits]), 0, 1)
    moved = detector.score(changed[..., None])
    worse = moved > original
    assert worse.all(), f"{(~worse).sum()} of {len(digits)} digits {change} scored as normal or more"
    assert np.mean(moved > detector.threshold) > 0.5
