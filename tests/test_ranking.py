"""aemon.ranking against scikit-learn (the reference, a test dependency only) and against hand-counted cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics

from aemon.ranking import average_precision, precision_recall_curve, roc_auc, roc_curve


def _cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(200):
        n = int(rng.integers(2, 80))
        labels = rng.integers(0, 2, n)
        labels[:2] = (0, 1)
        # Half the cases have many ties (a few distinct integer scores).
        scores = rng.integers(0, 4, n).astype(float) if i % 2 else rng.normal(size=n)
        cases.append((labels, scores))
    return cases


@pytest.mark.parametrize(("labels", "scores"), _cases())
def test_the_same_numbers_as_scikit_learn(labels: np.ndarray, scores: np.ndarray) -> None:
    assert roc_auc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(metrics.average_precision_score(labels, scores),
                                                              abs=1e-12)
    ours, theirs = roc_curve(labels, scores), metrics.roc_curve(labels, scores, drop_intermediate=False)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b)
    for a, b in zip(precision_recall_curve(labels, scores), metrics.precision_recall_curve(labels, scores),
                    strict=True):
        np.testing.assert_allclose(a, b)


def test_hand_counted() -> None:
    # Anomalous 3 and 1 against normal 2 and 0: of four pairs, three ranked right.
    assert roc_auc([1, 1, 0, 0], [3, 1, 2, 0]) == 0.75
    # A tie between an anomalous and a normal counts half.
    assert roc_auc([1, 0], [5, 5]) == 0.5
    assert roc_auc([1, 0], [4, 5]) == 0.0
    # Precision 1 at the first anomaly, 2/3 at the second.
    assert average_precision([1, 0, 1, 0], [4, 3, 2, 1]) == pytest.approx((1 + 2 / 3) / 2)


@pytest.mark.parametrize(("labels", "scores", "message"), [
    ([0, 0], [1, 2], "at least one normal and one anomalous"),
    ([1, 1], [1, 2], "at least one normal and one anomalous"),
    ([0, 2], [1, 2], "must be 0"),
    ([0, 1, 1], [1, 2], "3 labels for 2 scores"),
])
def test_bad_input_is_refused(labels: list[int], scores: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        roc_auc(labels, scores)
