"""Decisions as metrics and log lines: every counter, gauge and histogram a decision moves, and the
one ``item.decided`` event per record, in one place."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from aemon.logs import get_logger
from aemon.metrics import Metrics, observe_many

__all__ = ["Recorder"]

log = get_logger()

_LOGGED = ("item", "verdict", "score", "threshold", "p_value", "path")


class Recorder:
    """Counts and logs what the daemon decides.

    Args:
        metrics: The daemon's metrics.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        #: Decisions by verdict (array rows count one each), logged at shutdown.
        self.counts: dict[str, int] = {"ok": 0, "anomaly": 0, "rejected": 0}
        self._lock = threading.Lock()

    def model(self, name: str, version: str, arch: str, threshold: float) -> None:
        """A bundle was loaded."""
        self.metrics.threshold.set(threshold)
        self.metrics.model_info.info({"name": name, "version": version, "arch": arch})

    def ready(self, ready: bool) -> None:
        """This process started (or stopped) routing items."""
        self.metrics.processes.set(1 if ready else 0)

    def reload(self, ok: bool) -> None:
        """A SIGHUP reload ended."""
        self.metrics.reloads.labels(result="ok" if ok else "failed").inc()

    def scored(self, calls: list[float]) -> None:
        """One batch was scored, by model calls of these durations (seconds; one per slice of a large batch)."""
        for seconds in calls:
            self.metrics.scoring_duration.observe(seconds)
        self.metrics.batches.inc()

    def pending(self, n: int) -> None:
        """Entries waiting in the inbox or claimed and not committed."""
        self.metrics.inbox_pending.set(n)

    def decided(self, arrived: float, record: dict[str, Any]) -> None:
        """One record was committed (or finished from a stopped process's journal): its decision, its
        scores (every row's for an array part) and the log line."""
        now = time.time()
        verdict = record["verdict"]
        rows = record.get("n_rows") or 1
        m = self.metrics
        m.items.labels(verdict=verdict).inc(rows)
        if verdict == "rejected":
            m.errors.labels(reason=record["reason"]).inc()
        elif isinstance(score := record.get("score"), float) and "rows" not in record:  # one image: the quick way
            m.reconstruction_error.observe(score)  # with the decision, not at scoring (see below)
        else:  # an array part's rows; with the decision: a batch finished from a dead process's journal counts once
            observe_many(m.reconstruction_error, _scores(record))
        m.item_latency.observe(max(0.0, now - arrived))
        m.last_decision.set(now)
        with self._lock:
            self.counts[verdict] = self.counts.get(verdict, 0) + rows
        fields = {k: record.get(k) for k in _LOGGED}
        if verdict == "rejected":
            fields["reason"], fields["error"] = record["reason"], record["error"]
        if "n_rows" in record:
            fields["rows"] = record["n_rows"]
        (log.warning if verdict == "rejected" else log.info)("item.decided", **fields)


def _scores(record: dict[str, Any]) -> np.ndarray:
    """The scores of a record: its rows' for an array part, else its own."""
    rows = record.get("rows")
    found = [row.get("score") for row in rows if isinstance(row, dict)] if isinstance(rows, list) \
        else [record.get("score")]
    return np.asarray([s for s in found if isinstance(s, (int, float)) and not isinstance(s, bool)], np.float64)
