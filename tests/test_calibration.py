"""Conformal thresholds, sample counts, p-values and verdicts (aemon.calibration)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from aemon.calibration import Verdict, conformal_threshold, decide, p_values, required_samples
from aemon.errors import CalibrationError


@pytest.mark.parametrize(("n", "alpha"), [(19, 0.05), (100, 0.05), (99, 0.01), (1000, 0.1), (37, 0.2)])
def test_threshold_is_conformal_rank(n: int, alpha: float) -> None:
    """The threshold is the ceil((n+1)(1-alpha))-th smallest score, whatever the input order."""
    rng = np.random.default_rng(n)
    scores = rng.permutation(np.arange(1, n + 1, dtype=np.float64))
    rank = math.ceil((n + 1) * (1 - alpha))
    assert conformal_threshold(scores, alpha) == float(rank)


def test_threshold_exact_small_case() -> None:
    """With 19 scores at alpha 0.05 the threshold is the largest (rank ceil(20*0.95) = 19)."""
    scores = np.array([0.5, 0.1, 0.9, *np.linspace(0.2, 0.4, 16)])
    assert conformal_threshold(scores, 0.05) == 0.9
    assert conformal_threshold(np.arange(40.0), 0.05) == 38.0  # rank ceil(41*0.95) = 39


@pytest.mark.parametrize(("alpha", "needed"), [(0.05, 19), (0.01, 99), (0.1, 9), (0.5, 1), (0.001, 999)])
def test_required_samples(alpha: float, needed: int) -> None:
    """required_samples is the smallest n with ceil((n+1)(1-alpha)) <= n."""
    assert required_samples(alpha) == needed
    conformal_threshold(np.arange(needed, dtype=float), alpha)
    if needed > 1:
        with pytest.raises(CalibrationError):
            conformal_threshold(np.arange(needed - 1, dtype=float), alpha)


def test_too_few_samples_names_number_needed() -> None:
    """Too few calibration scores raise CalibrationError naming how many are needed."""
    with pytest.raises(CalibrationError, match=r"at least 99 normal samples, got 50"):
        conformal_threshold(np.zeros(50), 0.01)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_bad_target_fpr(alpha: float) -> None:
    """A target FPR outside (0, 1) is refused."""
    with pytest.raises(CalibrationError, match="between 0 and 1"):
        required_samples(alpha)


def test_nan_scores_refused() -> None:
    """NaN calibration scores are refused."""
    with pytest.raises(CalibrationError, match="NaN"):
        conformal_threshold(np.array([np.nan] * 30), 0.1)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_fresh_normal_fpr_matches_target(alpha: float) -> None:
    """On fresh draws from the calibration distribution the observed FPR is near the target."""
    rng = np.random.default_rng(1234)
    # Average over several calibration sets: one set's FPR varies by about sqrt(alpha / n).
    rates = []
    for _ in range(10):
        threshold = conformal_threshold(rng.standard_normal(2_000), alpha)
        rates.append(float(np.mean(rng.standard_normal(20_000) > threshold)))
    observed = float(np.mean(rates))
    assert abs(observed - alpha) < 0.25 * alpha + 0.002, (observed, alpha)
    # Conformal: at most alpha in expectation (plus sampling noise), never far below it.
    assert observed <= alpha * 1.2


def test_p_values_are_conformal() -> None:
    """p_value is (1 + calibration scores at or above the score) / (n + 1): never 0."""
    cal = np.array([1.0, 2.0, 2.0, 3.0, 4.0])
    got = p_values(np.array([0.5, 1.0, 2.0, 2.5, 4.0, 5.0]), cal)
    assert np.allclose(got, np.array([6, 6, 5, 3, 2, 1]) / 6)


def test_p_values_match_brute_force() -> None:
    """p_values agrees with a direct count on random data."""
    rng = np.random.default_rng(7)
    cal = np.sort(rng.random(300))
    scores = rng.random(50)
    expected = [(1 + np.sum(cal >= s)) / (cal.size + 1) for s in scores]
    assert np.allclose(p_values(scores, cal), expected)


def test_decide_is_strictly_above() -> None:
    """A score equal to the threshold is ok; only scores above it are anomalies."""
    assert decide(np.array([0.1, 0.5, 0.6]), 0.5) == [Verdict.OK, Verdict.OK, Verdict.ANOMALY]
    assert Verdict.ANOMALY == "anomaly"


def test_tiny_bundle_fpr_on_held_out_digits(tiny_bundle: Path, mnist_digits: np.ndarray) -> None:
    """On digits the tiny bundle never saw, the share above its threshold is plausibly near the target."""
    from aemon.bundle import load_bundle
    from aemon.images import array_to_input

    bundle = load_bundle(tiny_bundle)
    held_out = array_to_input(mnist_digits[1500:])  # the bundle trained on the first 1,500
    fpr = float(np.mean(bundle.score(held_out) > bundle.threshold))
    assert bundle.meta.target_fpr == 0.05  # conftest.TINY_FPR
    # 150 calibration samples: the realised FPR is Beta-distributed around 0.05, sd about 0.018.
    assert 0.0 < fpr < 0.15, fpr
