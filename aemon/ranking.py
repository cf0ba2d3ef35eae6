"""How well scores rank anomalous above normal: ROC and precision-recall curves and their areas.

Labels are 1 for anomalous (the positive class) and 0 for normal; a higher score means more anomalous.
Tied scores count as one threshold, and the area under the ROC gives a tie half, as in every textbook
(and scikit-learn, which the tests compare against). Written here so that the run-time environment
needs no scikit-learn or scipy (about 200 MB of the container image).
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_precision", "precision_recall_curve", "roc_auc", "roc_curve"]


def _counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives flagged at each distinct score, highest threshold first, and the thresholds."""
    labels = np.asarray(labels, np.float64).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels for {scores.size} scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if not (labels == 1).any() or not (labels == 0).any():
        raise ValueError("needs at least one normal and one anomalous score")
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = 1 + last_of_tie - tps
    return tps, fps, scores[last_of_tie]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1), and the thresholds."""
    tps, fps, thresholds = _counts(labels, scores)
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random anomalous score is above a random normal one."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def precision_recall_curve(labels: np.ndarray,
                           scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every distinct threshold, lowest threshold first, ending at (1, 0).

    Returns:
        Precision and recall (one more than thresholds, as scikit-learn gives them) and the thresholds.
    """
    tps, fps, thresholds = _counts(labels, scores)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: the precision at each threshold weighted by the recall it adds (no interpolation)."""
    tps, fps, _ = _counts(labels, scores)
    added_recall = np.diff(np.r_[0, tps]) / tps[-1]
    return float(np.sum(added_recall * tps / (tps + fps)))
