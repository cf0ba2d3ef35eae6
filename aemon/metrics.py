"""Every Prometheus metric of the contract, built on a registry that is passed in."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from aemon import errors

__all__ = ["Metrics", "build", "observe_many", "reserve_value_files", "REASONS"]

#: Every ``reason`` an item can be rejected for (the ``aemon_errors_total`` labels).
REASONS = tuple(sorted({cls.reason for cls in vars(errors).values()
                        if isinstance(cls, type) and issubclass(cls, errors.ItemRejected)}))

# Scores of pixel errors sit in [0, 1]; local and combined scores (z-scores, standardised sums) can be
# negative, and a z-score over a place where normal images barely vary reaches tens of thousands: the buckets
# span all of them.
#: From 0 up: a histogram with a negative bucket has no ``_sum`` in prometheus_client (in one process; the
#: multiprocess collector wrote one), so scores below 0 (local z-scores of ordinary images) count in ``le="0"``.
_SCORE_BUCKETS = (0, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1,
                  2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 100_000, 1_000_000, float("inf"))
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))
_SCORING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf"))


#: prometheus_client's value files of one process in multiprocess mode, by the kinds :func:`build` makes
#: (counters, histograms, and gauges by their multiprocess mode).
VALUE_FILES = ("counter", "histogram", "gauge_livemostrecent", "gauge_livesum", "gauge_max")
#: Bytes reserved for each (prometheus_client starts its files at 64 KiB; ours hold a few kilobytes).
VALUE_FILE_BYTES = 1 << 16


def reserve_value_files(folder: Path) -> None:
    """Create this process's value files in ``folder`` with their blocks allocated.

    prometheus_client makes them sparse and writes through a memory map: on a full filesystem the first
    write finds no block and the kernel kills the process with SIGBUS, nothing logged. Reserved here, a
    full disk is an ordinary ``OSError`` (ENOSPC) raised before any metric exists.
    """
    for kind in VALUE_FILES:
        fd = os.open(folder / f"{kind}_{os.getpid()}.db", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.posix_fallocate(fd, 0, VALUE_FILE_BYTES)
        finally:
            os.close(fd)


@dataclass
class Metrics:
    """The daemon's metrics (names and labels fixed by CONTRACT.md)."""

    items: Counter
    batches: Counter
    errors: Counter
    reconstruction_error: Histogram
    threshold: Gauge
    item_latency: Histogram
    scoring_duration: Histogram
    inbox_pending: Gauge
    last_decision: Gauge
    model_info: Info
    reloads: Counter
    processes: Gauge


def build(registry: CollectorRegistry, info_registry: CollectorRegistry | None = None) -> Metrics:
    """Create every metric on ``registry``.

    With worker processes (prometheus_client's multiprocess mode) counters and histograms are
    summed over the processes; the gauges say how: the threshold is the latest one set, pending
    entries are summed over live processes, the last decision is the latest of all.

    Args:
        registry: Where the metrics are registered (a fresh one per daemon in tests).
        info_registry: Where ``aemon_model_info`` goes (info metrics are not aggregated across
            processes: the main process serves its own); default ``registry``.
    """
    metrics = Metrics(
        items=Counter("aemon_items_total", "Items decided, by verdict.", ["verdict"], registry=registry),
        batches=Counter("aemon_batches_total", "Batches scored (a model call each, or one per slice of a large one).",
                        registry=registry),
        errors=Counter("aemon_errors_total", "Items rejected or failed, by reason.", ["reason"], registry=registry),
        reconstruction_error=Histogram("aemon_reconstruction_error", "Scores of scored images.",
                                       buckets=_SCORE_BUCKETS, registry=registry),
        threshold=Gauge("aemon_anomaly_threshold", "Threshold of the loaded bundle.", registry=registry,
                        multiprocess_mode="livemostrecent"),
        item_latency=Histogram("aemon_item_latency_seconds", "Arrival in the inbox to record written.",
                               buckets=_LATENCY_BUCKETS, registry=registry),
        scoring_duration=Histogram("aemon_scoring_duration_seconds", "Duration of one model call.",
                                   buckets=_SCORING_BUCKETS, registry=registry),
        inbox_pending=Gauge("aemon_inbox_pending", "Inbox entries seen and not yet routed.", registry=registry,
                            multiprocess_mode="livesum"),
        last_decision=Gauge("aemon_last_decision_timestamp_seconds", "Unix time of the last record written.",
                            registry=registry, multiprocess_mode="max"),
        # prometheus_client appends "_info": exposed as aemon_model_info{name,version,arch}.
        model_info=Info("aemon_model", "The loaded bundle.", registry=info_registry or registry),
        reloads=Counter("aemon_reloads_total", "SIGHUP reloads of the bundle, by result.", ["result"],
                        registry=registry),
        processes=Gauge("aemon_processes", "Daemon processes ready and routing items (the main one and its "
                        "workers).", registry=registry, multiprocess_mode="livesum"),
    )
    # Every known label value is exported as 0 from the start, so that rate() and alerts see the
    # series before the first event (and, with workers, so that every family is on /metrics).
    for result in ("ok", "failed"):
        metrics.reloads.labels(result=result)
    for verdict in ("ok", "anomaly", "rejected"):
        metrics.items.labels(verdict=verdict)
    for reason in REASONS:
        metrics.errors.labels(reason=reason)
    return metrics


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, with one update per bucket instead of one per value
    (10,000 rows of an array cost 60 ms one by one in multiprocess mode).

    Uses the layout of prometheus_client's unlabelled Histogram (``_upper_bounds``, ``_buckets``,
    ``_sum``), as ``observe`` does: a value goes to the first bucket whose bound it does not exceed,
    NaN to none, and every value to the sum. Without that layout, observes one value at a time.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    bounds, buckets, total = (getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for value in values.tolist():
            histogram.observe(value)
        return
    if values.size == 0:
        return
    total.inc(sum(values.tolist()))  # in order, as one observe after another adds them
    first = np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left")  # NaN sorts last
    counts = np.bincount(first[first < len(bounds)], minlength=len(bounds))
    for i in np.flatnonzero(counts):
        buckets[i].inc(int(counts[i]))
