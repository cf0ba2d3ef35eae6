"""The commit stage: turn a decided batch into files and records, on its own thread.

The loop thread decodes and scores batch *n+1* while this thread commits batch *n*: it writes
array parts and denoised outputs into the batch folder, writes the journal (one fsync), places
every file and writes every record (one fsync each), fsyncs the destination folders once and
removes the batch folder. Decisions are counted and logged only once committed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aemon.claims import Claim
from aemon.fsio import utc_now, write_durably
from aemon.images import input_to_array
from aemon.journal import Journal, Step, output_path, remove_batch
from aemon.logs import get_logger
from aemon.records import rejected_record, scored_record
from aemon.router import Router, png_bytes, png_name, rows_bytes
from aemon.units import Unit

__all__ = ["Batch", "Committer"]

log = get_logger()


@dataclass
class Batch:
    """A decided batch: every unit of one batch folder, with the model that scored it."""

    batch_dir: Path
    claims: list[Claim]
    units: list[Unit]
    model_name: str | None
    model_version: str | None
    threshold: float | None
    decided: list[tuple[Unit, dict]] = field(default_factory=list)


class Committer:
    """A thread that commits batches in order.

    Args:
        router: Chooses destinations and places files.
        inbox: Where files that reached a folder entry after it was expanded are given back.
        on_decided: Called with ``(unit, record)`` for every record once committed.
        on_committed: Called with each batch once committed.
        depth: Batches waiting at most (the loop blocks beyond: back-pressure).
    """

    def __init__(self, router: Router, inbox: Path, on_decided: Callable[[Unit, dict], None],
                 on_committed: Callable[[Batch], None], depth: int = 2) -> None:
        self.router = router
        self.inbox = inbox
        self.on_decided = on_decided
        self.on_committed = on_committed
        self._queue: queue.Queue[Batch | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._outstanding = 0
        self._lock = threading.Lock()
        self.failure: BaseException | None = None

    def start(self) -> None:
        """Start the commit thread."""
        self._thread = threading.Thread(target=self._run, name="aemon-commit", daemon=True)
        self._thread.start()

    def put(self, batch: Batch) -> None:
        """Queue a decided batch (blocks while ``depth`` batches wait)."""
        with self._lock:
            self._outstanding += 1
        self._queue.put(batch)

    def idle(self) -> bool:
        """True when nothing is queued or being committed."""
        with self._lock:
            return self._outstanding == 0

    def stop(self, timeout: float) -> bool:
        """Commit what is queued, then end the thread; False if it did not end within ``timeout``."""
        if self._thread is None:
            return True
        self._queue.put(None)
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        self._thread = None
        return not alive

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self.failure is None:
                try:
                    self.commit(batch)
                except BaseException as exc:  # a filesystem failure: the daemon stops, claims stay for recovery
                    self.failure = exc
                    log.error("commit.failed", batch=batch.batch_dir.name, error=str(exc))
            with self._lock:
                self._outstanding -= 1

    # -- one batch -------------------------------------------------------
    def commit(self, batch: Batch) -> None:
        """Plan, journal and carry out ``batch``; then report each decision."""
        journal = Journal(entries=[c.name for c in batch.claims])
        reserved: list[Path] = []
        try:
            for unit in batch.units:
                self._plan(batch, unit, journal, reserved)
            journal.write(batch.batch_dir)
            journal.run(self.router, batch.batch_dir)
        finally:
            self.router.release(reserved)
        for name in remove_batch(batch.batch_dir, self.inbox):
            log.warning("claim.returned", item=name, batch=batch.batch_dir.name)
        for unit, record in batch.decided:
            self.on_decided(unit, record)
        self.on_committed(batch)

    def _dest(self, folder: str, rel: str, reserved: list[Path]) -> Path:
        dest = self.router.destination(folder, rel)
        reserved.append(dest)
        return dest

    def _common(self, batch: Batch, unit: Unit) -> dict:
        common = {"model_name": batch.model_name, "model_version": batch.model_version,
                  "received_at": unit.claim.received_at, "decided_at": utc_now()}
        if unit.batch:
            common["batch"] = unit.batch
        return common

    def _output(self, batch: Batch, data: bytes, folder: str, rel: str, journal: Journal,
                reserved: list[Path]) -> str:
        """Write ``data`` into the batch folder durably and plan its placement; returns its destination."""
        tmp = output_path(batch.batch_dir, Path(rel).suffix)
        write_durably(tmp, data)
        dest = self._dest(folder, rel, reserved)
        journal.steps.append(Step(tmp.name, self.router.relative(dest)))
        return self.router.relative(dest)

    def _plan(self, batch: Batch, unit: Unit, journal: Journal, reserved: list[Path]) -> None:
        router = self.router
        src = unit.rel  # the unit's path inside the batch folder
        if unit.error is not None:
            dest = self._dest("rejected", unit.dest_rel, reserved)
            common = self._common(batch, unit)
            record = rejected_record(item=unit.rel, reason=unit.error.reason, error=str(unit.error),
                                     path=router.relative(dest), **common)
            journal.steps.append(Step(src, router.relative(dest), record))
            batch.decided.append((unit, record))
            return
        extra = {}
        if unit.raw is None:
            if unit.recon is not None:
                extra["denoised"] = self._output(batch, png_bytes(unit.recon[0]), "denoised", png_name(unit.dest_rel),
                                                 journal, reserved)
            verdict = unit.verdicts[0]
            dest = self._dest(verdict, unit.dest_rel, reserved)
            record = scored_record(item=unit.rel, verdict=verdict, score=float(unit.scores[0]),
                                   threshold=batch.threshold, p_value=float(unit.p_values[0]),
                                   path=router.relative(dest), **self._common(batch, unit), **extra)
            journal.steps.append(Step(src, router.relative(dest), record))
            batch.decided.append((unit, record))
            return
        raw = unit.raw
        if unit.recon is not None:
            extra["denoised"] = self._output(batch, rows_bytes(input_to_array(unit.recon, raw), unit.rel, unit.key),
                                             "denoised", unit.dest_rel, journal, reserved)
        names = np.array(unit.verdicts)
        for verdict in ("ok", "anomaly"):
            idx = np.flatnonzero(names == verdict)
            if idx.size == 0:
                continue
            tmp = output_path(batch.batch_dir, Path(unit.rel).suffix)
            write_durably(tmp, rows_bytes(raw[idx], unit.rel, unit.key))
            dest = self._dest(verdict, unit.dest_rel, reserved)
            rows = [{"index": int(j), "score": float(unit.scores[j]), "p_value": float(unit.p_values[j])}
                    for j in idx]
            record = scored_record(
                item=unit.rel, verdict=verdict, score=float(np.max(unit.scores[idx])), threshold=batch.threshold,
                p_value=float(np.min(unit.p_values[idx])), path=router.relative(dest), rows=rows,
                n_rows=int(idx.size), total_rows=len(raw), dtype=str(raw.dtype), **self._common(batch, unit), **extra,
            )
            if unit.key:
                record["array_key"] = unit.key
            journal.steps.append(Step(tmp.name, router.relative(dest), record))
            batch.decided.append((unit, record))
        journal.remove.append(src)
