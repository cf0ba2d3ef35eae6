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
import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from aemon.fsio import Folders, fsync_dir, mount_points, rename_noreplace, write_durably
from aemon.logs import get_logger
from aemon.records import encode_exact
from aemon.router import FOLDERS, USABLE, Router

__all__ = ["JOURNAL_NAME", "NAMING_FIELDS", "Step", "Journal", "read_journal", "output_path", "drop_undecided",
           "remove_batch", "prune_empty"]

JOURNAL_NAME = ".journal.json"
#: Steps (or records) carried out between two progress calls.
STEPS_PER_PROGRESS = 1024


#: Record fields that name another file of the batch: ``map`` (a name beside the record's item, per row
#: for arrays) and ``denoised`` (a path relative to the root).
NAMING_FIELDS = ("map", "denoised")


def _item_unmovable(exc: OSError, dest: str, batch_dir: Path) -> bool:
    """Whether a failed move is the item's own doing, not the result folder's: an immutable file or one in a
    sticky folder of another user (the destination is writable), or a file under a mount inside the dropped
    folder (no rename crosses mounts, bind mounts of one filesystem included)."""
    if exc.errno in (errno.EXDEV, errno.EBUSY):
        inside = os.path.join(os.path.realpath(batch_dir), "")
        return any(point.startswith(inside) for point in mount_points())
    return isinstance(exc, PermissionError) and os.access(os.path.dirname(dest), os.W_OK)


def _subfolder_refuses(dest: str, router: Router) -> bool:
    """Whether ``dest``'s folder is a folder inside a result folder (``ok/cam``, not ``ok`` itself) that refuses
    this process's writes: the router then passes it over for a free name (:meth:`Router.destination`)."""
    folder = os.path.dirname(dest)
    return "/" in router.relative(Path(folder)) and not os.access(folder, USABLE)


@dataclass
class Step:
    """Place ``src`` (relative to the batch folder) at ``dest`` (relative to the root), then write ``record``."""

    src: str
    dest: str
    record: dict[str, Any] | None = None
    #: The records that name this file: ``[step index, field, row or None]`` each (a field of
    #: :data:`NAMING_FIELDS`; a row: the ``map`` of that row of an array part). Kept true when the file
    #: gets another name.
    named_in: list[list] = field(default_factory=list)
    #: An anomaly map's name after its item's (``.map.png``): given again if the item gets another name.
    map_suffix: str | None = None
    #: Where the file lay (relative to the root) when a record name taken after its placement sent it to
    #: ``dest``: a run stopped between journal and move finishes the move.
    moved_from: str | None = None
    #: The record was reported (logged and counted) by a run that kept the batch: never reported again.
    reported: bool = False


@dataclass
class Journal:
    """The plan of one batch folder."""

    #: Names of the batch folder's entries that this plan covers.
    entries: list[str]
    steps: list[Step] = field(default_factory=list)
    #: Files (relative to the batch folder) to remove once every step is done.
    remove: list[str] = field(default_factory=list)
    #: Steps whose file could not be moved by the last :meth:`run` (their batch folder is kept).
    stuck: list[Step] = field(default_factory=list)
    #: Read back from its batch folder (a run after a stop), not planned by this process.
    replayed: bool = False

    def write(self, batch_dir: Path) -> None:
        """Store the plan durably in ``batch_dir``: the decision point of the batch."""
        data = {"entries": self.entries, "remove": self.remove, "steps": [_step_data(st) for st in self.steps]}
        write_durably(batch_dir / JOURNAL_NAME, encode_exact(data))
        fsync_dir(batch_dir)

    def unreported(self, done: list[Step]) -> list[Step]:
        """The steps of ``done`` with a record not reported yet."""
        return [step for step in done if step.record is not None and not step.reported]

    def keep(self, batch_dir: Path, done: list[Step]) -> None:
        """The batch folder is kept (files that could not be moved): mark the records of ``done`` as reported,
        durably, so that the runs at later starts report only what they finish."""
        for step in done:
            step.reported = step.reported or step.record is not None
        self.write(batch_dir)
        get_logger().error("claim.kept", batch=batch_dir.name, stuck=len(self.stuck))

    def run(self, router: Router, batch_dir: Path, progress: Callable[[], None] = lambda: None) -> list[Step]:
        """Carry out every step (idempotent); return the steps whose destination now exists.

        A destination taken meanwhile by another process gets a new free name; the journal is
        rewritten first so that recovery follows the item. ``progress`` is called every
        :data:`STEPS_PER_PROGRESS` steps and after each group of records.
        """
        root, base = os.fspath(router.root), os.fspath(batch_dir)
        done: list[Step] = []
        touched: set[str] = set()
        records: list[int] = []  # steps whose record is still to write
        with router.opened() as dests, Folders(batch_dir) as here:
            for n, step in enumerate(self.steps, 1):
                if n % STEPS_PER_PROGRESS == 0:
                    progress()
                dest = self._place(n - 1, router, dests, here, batch_dir)
                if not dests.lexists(dest):
                    continue  # removed by someone since an earlier run placed it
                if step.record is not None and not dests.lexists(dest + ".json"):
                    records.append(n - 1)
                touched.add(os.path.dirname(dest))
                done.append(step)
            while records:
                taken = set()
                for start in range(0, len(records), STEPS_PER_PROGRESS):
                    some = [self.steps[i] for i in records[start : start + STEPS_PER_PROGRESS]]
                    pairs = [(os.path.join(root, st.dest), st.record) for st in some]
                    try:
                        taken |= set(router.write_records(pairs, batch_dir))
                    except PermissionError:
                        taken |= self._records_one_by_one(some, pairs, router, batch_dir)
                    progress()
                # A record name taken meanwhile by someone else: move the item to a free name and try again
                # (its maps, placed already beside it, keep their names: the record names them as they are).
                records = [i for i in records if os.path.join(root, self.steps[i].dest) in taken]
                for i in records:
                    old = os.path.join(root, self.steps[i].dest)
                    self.steps[i].moved_from = self.steps[i].dest  # journalled with the new name
                    new = self._rename(i, router, batch_dir, maps_follow=False)
                    old_fd, old_name = dests.at(old)
                    router.place(old_name, new, src_dir_fd=old_fd)
                    touched.add(os.path.dirname(new))
            for rel in self.remove:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    fd, name = here.at(os.path.join(base, rel))
                    os.unlink(name, dir_fd=fd)
            router.sync_dirs(touched)
        return done

    def _records_one_by_one(self, steps: list[Step], pairs: list[tuple[str, dict]], router: Router,
                            batch_dir: Path) -> set[str]:
        """Write records one at a time after a group failed. The item of a record whose folder refuses writes
        was placed before the folder turned so (a replay, or a race): its step is stuck, and the batch is kept
        for a later start, where the record is written once the folder takes it. Returns the names taken."""
        taken: set[str] = set()
        for step, pair in zip(steps, pairs, strict=True):
            try:
                taken |= set(router.write_records([pair], batch_dir))
            except PermissionError as exc:
                if not _subfolder_refuses(pair[0], router):
                    raise
                get_logger().error("commit.record_refused", item=step.dest, error=str(exc),
                                   hint="its folder refuses the daemon's writes; the record is written at a later "
                                        "start, once it does")
                self.stuck.append(step)
        return taken

    def _place(self, index: int, router: Router, dests: Folders, here: Folders, batch_dir: Path) -> str:
        """Move the file of step ``index`` from the batch folder (``here``) to its destination (``dests``),
        both reached through open folders, never through a link; return the destination (renamed if taken)."""
        step = self.steps[index]
        dest = os.path.join(os.fspath(router.root), step.dest)
        while True:
            try:
                src_fd, src = here.at(os.path.join(os.fspath(batch_dir), step.src))
                src_info = os.stat(src, dir_fd=src_fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                if step.moved_from is not None and not dests.lexists(dest):
                    self._finish_move(step, router, dests, dest)
                return dest  # placed already (or its folder was swapped for a link: never followed)
            there = dests.lexists(dest)
            # A run stopped between link and unlink (renameat2's fall-back) left the destination holding this
            # very file. Only a replay can find that: in a first run, a destination of the same inode was placed
            # by another process, for another entry (hard links of one file dropped under one name).
            if there and self.replayed and _same_file(src_info, dests, dest):
                os.unlink(src, dir_fd=src_fd)
                return dest
            if there or dests.lexists(dest + ".json"):
                dest = self._rename(index, router, batch_dir)
                continue
            try:
                router.place(src, dest, src_dir_fd=src_fd)
            except FileExistsError:
                continue
            except NotADirectoryError:  # a folder on the way is now a file or a link: a free name
                dest = self._rename(index, router, batch_dir)
                continue
            except OSError as exc:
                refused = isinstance(exc, PermissionError) and _subfolder_refuses(dest, router)
                if refused and step.map_suffix is None:
                    dest = self._rename(index, router, batch_dir)  # a free folder name beside it: cam-1/
                    continue
                if not refused and not _item_unmovable(exc, dest, batch_dir):
                    raise  # e.g. the result folder refuses writes: the daemon's problem, not the item's
                # A map whose item is placed already, in a folder that has refused writes since, waits too: the
                # record names it beside its item.
                # The item itself cannot be moved (immutable, in a sticky folder of another user, or on a
                # filesystem mounted inside the dropped folder): it stays in the batch folder, which is kept,
                # and the daemon goes on.
                get_logger().error("commit.unmovable", item=step.src, error=str(exc),
                                   hint="the file cannot be moved (immutable, a sticky folder of another user, "
                                        "or a mount inside the dropped folder); it stays in .aemon/claims "
                                        "until it can be")
                self.stuck.append(step)
            return dest

    def _finish_move(self, step: Step, router: Router, dests: Folders, dest: str) -> None:
        """Move a placed file from ``step.moved_from`` to ``dest``, where a stopped run journalled it."""
        old = os.path.join(os.fspath(router.root), step.moved_from)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            old_fd, old_name = dests.at(old)
            router.place(old_name, dest, src_dir_fd=old_fd)

    def _rename(self, index: int, router: Router, batch_dir: Path, maps_follow: bool = True) -> str:
        """Give step ``index`` a new free destination, journalled first so that recovery follows it; return it.

        The records naming it are changed with it; with ``maps_follow`` (its maps not placed yet), its anomaly
        maps are named after its new name.
        """
        step = self.steps[index]
        folder, _, rest = step.dest.partition("/")
        new = router.destination(folder, rest)
        router.release([new])
        step.dest = router.relative(new)
        if step.record is not None:
            step.record["path"] = step.dest
        self._name(step)
        if maps_follow:
            for other in self.steps[index + 1:]:
                if (other.map_suffix is not None and other.named_in and other.named_in[0][0] == index
                        and os.path.lexists(os.path.join(batch_dir, other.src))):  # not placed yet
                    other.dest = step.dest + other.map_suffix
                    self._name(other)
        self.write(batch_dir)
        return os.fspath(new)

    def _name(self, step: Step) -> None:
        """Write ``step``'s destination into the records that name it."""
        for index, name, row in step.named_in:
            record = self.steps[index].record
            if record is None:
                continue
            value = PurePosixPath(step.dest).name if name == "map" else step.dest
            if row is None:
                record[name] = value
                continue
            for entry in record.get("rows", []):
                if entry.get("index") == row:
                    entry[name] = value


def _same_file(info: os.stat_result, dests: Folders, path: str) -> bool:
    try:
        fd, name = dests.at(path)
        other = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (other.st_dev, other.st_ino)


def read_journal(batch_dir: Path) -> Journal | None:
    """The journal of ``batch_dir``, or None if the batch was never decided.

    A journal naming a path outside the batch folder or the result folders (none that aemon writes
    does) is logged as ``claim.bad_journal`` and ignored: its batch is routed again like an undecided one.
    """
    try:
        data = json.loads((batch_dir / JOURNAL_NAME).read_text())
        journal = Journal(entries=list(data["entries"]), steps=[Step(**s) for s in data["steps"]],
                          remove=list(data.get("remove", [])), replayed=True)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    stray = _stray_path(journal)
    if stray is not None:
        get_logger().error("claim.bad_journal", batch=batch_dir.name, path=stray,
                           hint="a journal names only files of its batch folder and result folders; ignored")
        return None
    return journal


def _stray_path(journal: Journal) -> str | None:
    """The first path of ``journal`` that would lead out of its batch folder or the result folders, if any."""
    def inside(path: object, folders: tuple[str, ...] | None) -> bool:
        if not isinstance(path, str) or not path or "\0" in path:
            return False
        parts = PurePosixPath(path).parts
        return (bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts
                and (folders is None or (len(parts) > 1 and parts[0] in folders)))

    for entry in journal.entries:
        if not inside(entry, None) or "/" in entry:
            return str(entry)
    for step in journal.steps:
        if not inside(step.src, None):
            return str(step.src)
        if not inside(step.dest, FOLDERS):
            return str(step.dest)
        if step.moved_from is not None and not inside(step.moved_from, FOLDERS):
            return str(step.moved_from)
        if not _names_ok(step, journal.steps):
            return f"{step.dest} (named_in {step.named_in!r}, map_suffix {step.map_suffix!r})"
    return next((str(rel) for rel in journal.remove if not inside(rel, None)), None)


def _names_ok(step: Step, steps: list[Step]) -> bool:
    """Whether ``step``'s record and naming fields have the shapes aemon writes (a planted journal may hold
    anything)."""
    if step.record is not None and not (isinstance(step.record, dict) and isinstance(step.record.get("rows", []), list)
                                        and all(isinstance(row, dict) for row in step.record.get("rows", []))):
        return False
    if step.map_suffix is not None and (not isinstance(step.map_suffix, str) or "/" in step.map_suffix
                                        or "\0" in step.map_suffix or not step.map_suffix.startswith(".map")):
        return False
    return isinstance(step.named_in, list) and all(
        isinstance(entry, list) and len(entry) == 3 and type(entry[0]) is int and 0 <= entry[0] < len(steps)
        and entry[1] in NAMING_FIELDS and (entry[2] is None or type(entry[2]) is int)
        for entry in step.named_in)


def _step_data(step: Step) -> dict[str, Any]:
    """A step as stored; the naming fields only where set (a journal without them reads as before)."""
    data: dict[str, Any] = {"src": step.src, "dest": step.dest, "record": step.record}
    if step.named_in:
        data["named_in"] = step.named_in
    if step.map_suffix is not None:
        data["map_suffix"] = step.map_suffix
    if step.moved_from is not None:
        data["moved_from"] = step.moved_from
    if step.reported:
        data["reported"] = True
    return data


def output_path(batch_dir: Path, suffix: str) -> Path:
    """A hidden name in ``batch_dir`` for an output written before the journal (array part, denoised image)."""
    return batch_dir / f".out-{os.urandom(6).hex()}{suffix}"


def drop_undecided(batch_dir: Path, keep: str = "\0") -> None:
    """Remove outputs of a batch that was never decided (hidden files of the batch folder but those whose
    names start with ``keep``)."""
    for entry in os.scandir(batch_dir):
        if entry.name.startswith(".") and not entry.name.startswith(keep):
            _remove(entry.path)


def remove_batch(batch_dir: Path, inbox: Path) -> list[str]:
    """Delete a committed batch folder, its journal last: a crash midway leaves a journal to run again.

    Only the daemon's own files and empty folders are deleted. Anything else still in it (a file
    that reached a folder entry after it was expanded) goes back to ``inbox`` to be taken again.

    Returns:
        The names given back to the inbox.
    """
    returned: list[str] = []
    for entry in os.scandir(batch_dir):
        if entry.name == JOURNAL_NAME:
            continue
        if entry.name.startswith("."):
            _remove(entry.path)
        elif not (entry.is_dir(follow_symlinks=False) and prune_empty(entry.path)):
            returned.append(_give_back(entry.path, inbox))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(batch_dir / JOURNAL_NAME)
    with contextlib.suppress(OSError):
        os.rmdir(batch_dir)
    return returned


def prune_empty(folder: str | os.PathLike) -> bool:
    """Remove ``folder`` and the folders under it that hold nothing else; True if ``folder`` is gone."""
    for dirpath, _, _ in os.walk(folder, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)
    return not os.path.lexists(folder)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _give_back(path: str, inbox: Path) -> str:
    if os.path.islink(inbox) or not os.path.isdir(inbox):  # a link put at its path would lead out of the root
        raise NotADirectoryError(errno.ENOTDIR, "is a link or a file, not a folder; aemon never follows links",
                                 os.fspath(inbox))
    name = os.path.basename(path)
    stem, suffix = os.path.splitext(name)
    candidate, n = name, 0
    while True:
        try:
            rename_noreplace(path, inbox / candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{stem}-{n}{suffix}"
