"""The batch journal: how a decided batch is committed so that a crash at any instant is finished on restart.

For each batch the daemon writes, before touching any destination, one journal file in the batch
folder listing every step: a file to place (an item, an array part or a denoised output, the
latter two already written durably into the batch folder) at its destination, the record to
write beside it, and the files to remove afterwards (an array once its parts are placed). The
journal is fsync'd once; then the steps run; then the destination folders are fsync'd once and
the batch folder is removed.

Every step is idempotent, so recovery simply runs the journal again: an item still in the batch
folder is placed, a destination without its record gets it, an item caught between ``link``
and ``unlink`` is unlinked. A batch folder without a journal was never decided: its entries
are routed again and its half-written outputs dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aemon.bundle import fsync_dir
from aemon.router import Router, write_durably

__all__ = ["JOURNAL_NAME", "Step", "Journal", "read_journal", "output_path", "drop_undecided", "remove_batch"]

JOURNAL_NAME = ".journal.json"


@dataclass
class Step:
    """Place ``src`` (relative to the batch folder) at ``dest`` (relative to the root), then write ``record``."""

    src: str
    dest: str
    record: dict[str, Any] | None = None


@dataclass
class Journal:
    """The plan of one batch folder."""

    #: Names of the batch folder's entries that this plan covers.
    entries: list[str]
    steps: list[Step] = field(default_factory=list)
    #: Files (relative to the batch folder) to remove once every step is done.
    remove: list[str] = field(default_factory=list)

    def write(self, batch_dir: Path) -> None:
        """Store the plan durably in ``batch_dir``: the decision point of the batch."""
        data = {"entries": self.entries, "remove": self.remove,
                "steps": [{"src": st.src, "dest": st.dest, "record": st.record} for st in self.steps]}
        write_durably(batch_dir / JOURNAL_NAME, json.dumps(data).encode())
        fsync_dir(batch_dir)

    def run(self, router: Router, batch_dir: Path) -> list[Step]:
        """Carry out every step (idempotent); return the steps whose destination now exists.

        A destination taken meanwhile by another process gets a new free name; the journal is
        rewritten first so that recovery follows the item.
        """
        root, base = os.fspath(router.root), os.fspath(batch_dir)
        done: list[Step] = []
        touched: set[str] = set()
        records: list[tuple[str, dict[str, Any]]] = []
        for step in self.steps:
            src, dest = os.path.join(base, step.src), os.path.join(root, step.dest)
            while os.path.lexists(src):
                if os.path.lexists(dest):
                    if _same_file(src, dest):  # stopped between link and unlink
                        os.unlink(src)
                        break
                    self._rename(step, router, batch_dir)
                    dest = os.path.join(root, step.dest)
                    continue
                try:
                    router.place(src, dest)
                except FileExistsError:
                    continue
                break
            if not os.path.lexists(dest):
                continue  # removed by someone since an earlier run placed it
            if step.record is not None and not os.path.lexists(dest + ".json"):
                records.append((dest, step.record))
            touched.add(os.path.dirname(dest))
            done.append(step)
        router.write_records(records, batch_dir)
        for rel in self.remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(base, rel))
        router.sync_dirs(touched)
        return done

    def _rename(self, step: Step, router: Router, batch_dir: Path) -> None:
        folder, *rest = Path(step.dest).parts
        new = router.destination(folder, "/".join(rest))
        router.release([new])
        step.dest = router.relative(new)
        if step.record is not None:
            step.record["path"] = step.dest
        self.write(batch_dir)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def read_journal(batch_dir: Path) -> Journal | None:
    """The journal of ``batch_dir``, or None if the batch was never decided."""
    try:
        data = json.loads((batch_dir / JOURNAL_NAME).read_text())
        return Journal(entries=list(data["entries"]), steps=[Step(**s) for s in data["steps"]],
                       remove=list(data.get("remove", [])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def output_path(batch_dir: Path, suffix: str) -> Path:
    """A hidden name in ``batch_dir`` for an output written before the journal (array part, denoised image)."""
    return batch_dir / f".out-{os.urandom(6).hex()}{suffix}"


def drop_undecided(batch_dir: Path) -> None:
    """Remove outputs of a batch that was never decided (hidden files of the batch folder)."""
    for entry in batch_dir.iterdir():
        if entry.name.startswith("."):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def remove_batch(batch_dir: Path) -> None:
    """Delete a committed batch folder, its journal last: a crash midway leaves a journal to run again."""
    for entry in os.scandir(batch_dir):
        if entry.name == JOURNAL_NAME:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(batch_dir / JOURNAL_NAME)
    with contextlib.suppress(OSError):
        os.rmdir(batch_dir)
