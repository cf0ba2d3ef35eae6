"""Metric helpers against prometheus_client itself."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from aemon.metrics import observe_many


def test_observe_many_exposes_what_observing_one_by_one_does() -> None:
    """Bucket counts, count and sum equal one observe per value: bounds themselves, values between
    and beyond them, negatives, infinities; NaN counts in no bucket (and makes the sum NaN) in both."""
    buckets = (-1, 0, 0.5, 1, 10, float("inf"))
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.5, 3, 500), [-1, 0, 0.5, 1, 10, -np.inf, np.inf, 1e9, -5]])
    for case in (values, np.append(values, np.nan), np.array([])):
        one, many = CollectorRegistry(), CollectorRegistry()
        h_one = Histogram("h", "h", buckets=buckets, registry=one)
        h_many = Histogram("h", "h", buckets=buckets, registry=many)
        for v in case.tolist():
            h_one.observe(v)
        observe_many(h_many, case)
        lines = [line for line in generate_latest(one).decode().splitlines() if "_created" not in line]
        assert lines == [line for line in generate_latest(many).decode().splitlines() if "_created" not in line]
