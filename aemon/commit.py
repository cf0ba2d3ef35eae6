"""The commit stage: turn a decided batch into files and records.

It writes array parts, denoised outputs and maps into the batch folder (one syncfs for them all),
writes the journal (one fsync), places every file and writes every record, makes the destination
folders durable, reports (logs and counts) each decision and removes the batch folder. Decisions are
reported only once committed, and before the batch folder goes: at least once, whatever stops the process.
It runs on the loop's own thread, after scoring: worker processes (:mod:`aemon.workers`) keep the
other cores busy, and a second thread in one process would only trade the GIL back and forth (it cost
a third more CPU per file, measured).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aemon.claims import Claim
from aemon.fsio import write_all_durably
from aemon.journal import STEPS_PER_PROGRESS, Journal, Step, output_path, remove_batch
from aemon.logs import get_logger
from aemon.pipeline import plan
from aemon.router import Router
from aemon.units import Unit

__all__ = ["Batch", "Committer"]

log = get_logger()

#: Most new files (array parts, denoised outputs, maps) written with one filesystem sync; a batch with
#: more (an array with thousands of maps) reports progress between them.
WRITES_PER_SYNC = 1024


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
    """Commits decided batches.

    Args:
        router: Chooses destinations and places files.
        inbox: Where files that reached a folder entry after it was expanded are given back.
        on_decided: Called with ``(unit, record)`` for every record once committed.
        on_committed: Called with each batch once committed.
        progress: Called between the parts of a large commit (the daemon's liveness heartbeat).
    """

    def __init__(self, router: Router, inbox: Path, on_decided: Callable[[Unit, dict], None],
                 on_committed: Callable[[Batch], None], progress: Callable[[], None] = lambda: None) -> None:
        self.router = router
        self.inbox = inbox
        self.on_decided = on_decided
        self.on_committed = on_committed
        self.progress = progress

    # -- one batch -------------------------------------------------------
    def commit(self, batch: Batch) -> None:
        """Plan, journal and carry out ``batch``; then report each decision.

        Raises:
            OSError: a filesystem failure (the daemon stops; the batch stays claimed for recovery).
        """
        journal = Journal(entries=[c.name for c in batch.claims])
        reserved: list[Path] = []
        writes: list[tuple[str, bytes]] = []
        try:
            with self.router.opened():  # one batch: every folder opened once, never through a link
                for unit in batch.units:
                    self._plan(batch, unit, journal, reserved, writes)
                self.progress()
                for start in range(0, len(writes), WRITES_PER_SYNC):  # on disk before the journal names them
                    write_all_durably(writes[start : start + WRITES_PER_SYNC])
                    self.progress()
                journal.write(batch.batch_dir)
                done = journal.run(self.router, batch.batch_dir, self.progress)
                # Reported while the journal is still there: a death before it is removed reports the batch
                # again at the next start (at least once), a death after it never leaves a decision unreported.
                self._report(batch, done)
                if journal.stuck:  # kept in the claims folder: given back, it would be taken again at once
                    journal.keep(batch.batch_dir, done)
        except OSError as exc:
            log.error("commit.failed", batch=batch.batch_dir.name, error=str(exc))
            raise
        finally:
            self.router.release(reserved)
        if not journal.stuck:
            for name in remove_batch(batch.batch_dir, self.inbox):
                log.warning("claim.returned", item=name, batch=batch.batch_dir.name)
        self.on_committed(batch)

    def _report(self, batch: Batch, done: list[Step]) -> None:
        """Log and count each decision placed (an item that could not be moved is reported once it is, at a
        later start)."""
        placed = {id(step.record) for step in done if step.record is not None}
        for unit, record in batch.decided:
            if id(record) in placed:
                self.on_decided(unit, record)

    def _plan(self, batch: Batch, unit: Unit, journal: Journal, reserved: list[Path],
              writes: list[tuple[str, bytes]]) -> None:
        """Turn :func:`aemon.pipeline.plan` into journal steps: new bytes go to ``writes`` (files of
        the batch folder, written durably before the journal), and every placement is a rename
        recorded in the journal."""
        outputs, remove_source = plan(unit, (batch.model_name, batch.model_version), batch.threshold)
        named: dict[str, str] = {}
        naming: list[tuple[Step, str]] = []  # outputs named in every later record, and by which field
        last: tuple[Path, dict | None, int] | None = None  # the previous output placed, its record and step
        rows: dict[int, dict] = {}  # the rows of the previous record, by index
        for n, out in enumerate(outputs, 1):
            if n % STEPS_PER_PROGRESS == 0:
                self.progress()  # an array with maps of every row: tens of thousands of outputs
            step = Step("", "")
            if out.map_suffix is not None and last is not None:
                dest = self._map_destination(last[0], out.map_suffix, reserved)
                if last[1] is not None:
                    _name_map(last[1], rows, dest.name, out.map_row)
                    step.named_in.append([last[2], "map", out.map_row])
                    step.map_suffix = out.map_suffix
            else:
                dest = self.router.destination(out.folder, out.rel)
                reserved.append(dest)
            step.dest = self.router.relative(dest)
            if out.data is None:
                step.src = unit.rel  # the unit's own file, inside the batch folder
            else:
                tmp = output_path(batch.batch_dir, Path(out.map_suffix or out.rel).suffix)
                writes.append((str(tmp), out.data))
                step.src = tmp.name
            if out.record is not None:
                step.record = {**out.record, "path": step.dest, **named}
                batch.decided.append((unit, step.record))
                for earlier, name in naming:
                    earlier.named_in.append([len(journal.steps), name, None])
            journal.steps.append(step)
            if out.names_as:
                named[out.names_as] = step.dest
                naming.append((step, out.names_as))
            if out.map_suffix is None:
                last = (dest, step.record, len(journal.steps) - 1)
                rows = {entry["index"]: entry for entry in (step.record or {}).get("rows", [])}
        if remove_source:
            journal.remove.append(unit.rel)

    def _map_destination(self, item: Path, suffix: str, reserved: list[Path]) -> Path:
        """``item`` + ``suffix`` (reserved with the item for ``.map.png``), or a free name beside it."""
        wanted = Path(f"{item}{suffix}")
        if suffix == ".map.png" and not os.path.lexists(wanted):
            return wanted
        folder, _, rest = self.router.relative(wanted).partition("/")
        dest = self.router.destination(folder, rest)
        reserved.append(dest)
        return dest


def _name_map(record: dict, rows: dict[int, dict], name: str, row: int | None) -> None:
    """Name a map in its item's record: ``map`` (relative to the record's folder), per row for arrays
    (``rows``: the record's rows by index)."""
    if row is None:
        record["map"] = name
    elif row in rows:
        rows[row]["map"] = name
