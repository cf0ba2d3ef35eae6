"""Threshold calibration and p-values (numpy only).

The threshold is the split-conformal quantile of held-out normal scores: with ``n``
calibration scores and target false-positive rate ``alpha``, the ``ceil((n+1)(1-alpha))``-th
smallest score. An item whose score is strictly above the threshold is an anomaly; on fresh
normal data this flags at most ``alpha`` of items in expectation.
"""

from __future__ import annotations

import math
from enum import StrEnum

import numpy as np

from aemon.errors import CalibrationError

__all__ = ["Verdict", "required_samples", "conformal_threshold", "p_values", "is_anomalous", "decide"]


class Verdict(StrEnum):
    """Where an item ends up."""

    #: Scored at or below the threshold.
    OK = "ok"
    #: Scored above the threshold.
    ANOMALY = "anomaly"
    #: Could not be scored.
    REJECTED = "rejected"


def required_samples(target_fpr: float) -> int:
    """Fewest calibration scores for which the conformal quantile exists."""
    if not 0 < target_fpr < 1:
        raise CalibrationError(f"target FPR must be between 0 and 1 (exclusive), got {target_fpr}")
    # ceil((n + 1)(1 - a)) <= n  <=>  n >= (1 - a) / a; the epsilon absorbs float noise.
    return max(1, math.ceil((1 - target_fpr) / target_fpr - 1e-9))


def conformal_threshold(scores: np.ndarray, target_fpr: float) -> float:
    """The ``ceil((n+1)(1-alpha))``-th smallest of ``scores``.

    Raises:
        CalibrationError: too few scores for this target, with the number needed.
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = scores.size
    needed = required_samples(target_fpr)
    if n < needed:
        raise CalibrationError(
            f"calibrating at a target FPR of {target_fpr} needs at least {needed} normal samples, got {n}; "
            "give more normal data or raise --target-fpr"
        )
    if not np.isfinite(scores).all():
        raise CalibrationError("calibration scores contain NaN or infinity; the model output is broken")
    rank = min(n, math.ceil((n + 1) * (1 - target_fpr) - 1e-9))
    return float(scores[rank - 1])


def p_values(scores: np.ndarray, sorted_calibration: np.ndarray) -> np.ndarray:
    """Conformal p-values: ``(1 + #calibration scores >= score) / (n + 1)``; never 0."""
    cal = np.asarray(sorted_calibration, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    at_or_above = cal.size - np.searchsorted(cal, scores, side="left")
    return (1.0 + at_or_above) / (cal.size + 1.0)


def is_anomalous(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The one threshold rule: a score strictly above the threshold is an anomaly (so is a score that is not a
    number: a broken score never lets an item pass)."""
    return ~(np.asarray(scores, dtype=np.float64).ravel() <= threshold)


def decide(scores: np.ndarray, threshold: float) -> list[str]:
    """``anomaly`` where :func:`is_anomalous`, else ``ok`` (verdict values, one per score)."""
    return np.where(is_anomalous(scores, threshold), Verdict.ANOMALY.value, Verdict.OK.value).tolist()
