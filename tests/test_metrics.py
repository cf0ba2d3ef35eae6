"""Metric helpers against prometheus_client itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_reserved_value_files_cover_every_file_the_metrics_write(tmp_path: Path) -> None:
    """In multiprocess mode every value file that building the metrics opens is one that
    reserve_value_files allocated first (a new kind of metric must be reserved too, or a full disk kills
    the process with SIGBUS)."""
    code = ("import json, os; from prometheus_client import CollectorRegistry; from aemon.metrics import build; "
            "build(CollectorRegistry()); folder = os.environ['PROMETHEUS_MULTIPROC_DIR']; "
            "print(json.dumps([n.rsplit('_', 1)[0] for n in os.listdir(folder)]))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout
    from aemon.metrics import VALUE_FILES

    written = set(json.loads(out))
    assert written and written <= set(VALUE_FILES), (written, VALUE_FILES)


def test_score_buckets_resolve_the_z_scores_local_scores_reach() -> None:
    """A zmax bundle scores noise near 40,000 and some digits near 2,600: every score above 1,000 fell in the
    +Inf bucket, and the dashboard's score percentiles read 1,000 (helper's attack)."""
    from aemon.metrics import build

    registry = CollectorRegistry()
    metrics = build(registry)
    observe_many(metrics.reconstruction_error, np.array([2_626.0, 38_714.0]))
    count = {le: registry.get_sample_value("aemon_reconstruction_error_bucket", {"le": le})
             for le in ("1000.0", "5000.0", "10000.0", "100000.0")}
    assert count == {"1000.0": 0, "5000.0": 1, "10000.0": 1, "100000.0": 2}, count
