"""Claims: the daemon's hold on inbox entries it has taken and not finished.

An entry is claimed by ``os.rename`` from ``inbox/`` into a batch folder
``.aemon/claims/<owner>/<first-arrival-µs>-<id>/``, keeping its name; the rename is the lock
between daemons sharing a root. Each running daemon owns one ``<owner>`` folder and holds an
exclusive ``flock`` on its ``.lock`` file for its lifetime. A batch folder whose owner is no
longer running (its lock is free: the process exited or was killed) is adopted by a live daemon,
at start-up and at every rescan, and finished or routed again (see :mod:`aemon.journal`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from aemon.errors import Crashed, ItemRejected
from aemon.fsio import fsync_dir, iso_time, own_folder_usable, rename_noreplace, write_durably
from aemon.journal import drop_undecided, prune_empty, read_journal, remove_batch
from aemon.logs import get_logger
from aemon.router import Router

__all__ = ["Claim", "ClaimStore", "Identity", "Replaced", "identity"]

log = get_logger()

LOCK_NAME = ".lock"
#: Hidden files of a batch folder that count how often it was tried again after a process died in it:
#: ``.tries-N`` is made, durably, as the N-th such try begins.
TRIES_PREFIX = ".tries-"
#: An entry alone in its batch folder with this many tries begun, each ended by a death, is rejected.
MAX_TRIES_ALONE = 2
#: A daemon's own temp folder inside its claims folder (removed with it).
TEMP_NAME = ".tmp"


class Identity(NamedTuple):
    """What tells an inbox entry from another put under its name since: its inode, and what writing it changes.
    An inode number is reused at once (a file removed and written again in place gets the same number), so
    the number alone does not tell; the status time does not either, as it changes without a write (a chmod,
    the claim of another hard link to the same file)."""

    dev: int
    ino: int
    mtime_ns: int
    size: int


def identity(st: os.stat_result) -> Identity:
    """The identity of the entry that ``st`` (its ``lstat``) describes."""
    return Identity(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class Replaced(Exception):
    """The entry under a name is not the one judged complete: another came under the name since (a second process
    claimed the first, and its writer made a new one at once). It is left in the inbox, or given back to it."""

    def __init__(self, name: str, given_back: bool) -> None:
        super().__init__(name)
        #: It came between the look and the rename, and was renamed back into the inbox.
        self.given_back = given_back


@dataclass
class Claim:
    """One inbox entry the daemon has taken and not finished."""

    #: The entry's name in ``inbox/`` (top level).
    name: str
    #: Where the entry lies now, inside its batch folder.
    path: Path
    #: The batch folder holding it; removed once its whole batch is committed.
    batch_dir: Path
    #: When the entry was first seen in the inbox (epoch seconds).
    arrived: float
    #: Why the entry is rejected without being opened (processes died deciding it), if it is.
    error: ItemRejected | None = None

    @property
    def received_at(self) -> str:
        """Arrival time, ISO 8601 UTC."""
        return iso_time(self.arrived)


class ClaimStore:
    """Batch folders of one daemon under ``root/.aemon/claims``.

    Args:
        root: The daemon's root folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.base = self.root / ".aemon" / "claims"
        self.owner = self.base / owner_name()
        self._lock_fd: int | None = None
        #: The try of each batch folder this process began after a death (its ``.tries-N``).
        self._begun: dict[Path, int] = {}

    def open(self) -> None:
        """Create this daemon's owner folder and lock it for the process lifetime."""
        for _ in range(10):
            self.owner.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.owner / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
            except FileNotFoundError:  # removed by a daemon that saw it unlocked: start again
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                if os.stat(self.owner / LOCK_NAME).st_ino == os.fstat(fd).st_ino:
                    self._lock_fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)
            self.owner = self.base / owner_name()
        raise OSError(f"could not lock a claims folder under {self.base}")

    @property
    def temp(self) -> Path:
        """This daemon's temp folder (for libraries), inside its owner folder."""
        return self.owner / TEMP_NAME

    def close(self) -> None:
        """Drop the lock; remove the owner folder if no batch is left in it."""
        if self._lock_fd is None:
            return
        shutil.rmtree(self.temp, ignore_errors=True)
        if not [name for name in os.listdir(self.owner) if name != LOCK_NAME]:
            shutil.rmtree(self.owner, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def new_batch(self, arrived: float) -> Path:
        """A new, empty batch folder named after the first arrival time in it.

        Raises:
            NotADirectoryError: the claims folder or this daemon's own folder in it was replaced by a link or a
                file while the daemon ran (it is never followed: the daemon stops, and its next start says so).
        """
        for folder in (self.base, self.owner):
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "replaced by a link or a file while the daemon ran; aemon "
                                         "never follows links out of its root", os.fspath(folder))
        path = self.owner / f"{int(arrived * 1e6):016d}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def claim(self, name: str, inbox_fd: int, batch_dir: Path, arrived: float, judged: Identity) -> Claim | None:
        """Rename entry ``name`` of the open inbox folder ``inbox_fd`` into ``batch_dir`` (never over a name
        there); None if it is gone (another daemon took it). The folder is the one opened at start-up,
        even if a link has been put at its path since: nothing is taken from outside the root.

        Only the entry judged complete is taken (``judged``: its identity then). Another under its name (one
        that came the moment another process claimed the first) is left in the inbox, or given back to it if it
        came between the look and the rename (the inbox must not read that return as a publish).

        Raises:
            Replaced: the entry under ``name`` is not the one judged.
            PermissionError: a read-only folder of another owner (it cannot be moved; it stays in the inbox).
        """
        target = batch_dir / name
        try:
            self._check(name, inbox_fd, judged)
            try:
                rename_noreplace(name, target, src_dir_fd=inbox_fd)
            except PermissionError:  # a read-only folder cannot change parents: open it up if it is ours
                self._check(name, inbox_fd, judged)  # never another's, come meanwhile
                if not own_folder_usable(name, dir_fd=inbox_fd):
                    raise
                rename_noreplace(name, target, src_dir_fd=inbox_fd)
            claimed = os.lstat(target)
        except (FileNotFoundError, FileExistsError):  # gone, or taken at the next rescan
            return None
        if not _moved_unchanged(claimed, judged):
            self._give_back(name, target, inbox_fd)
        return Claim(name, target, batch_dir, arrived)

    @staticmethod
    def _check(name: str, inbox_fd: int, judged: Identity) -> None:
        """Raise :class:`Replaced` if the entry under ``name`` is not the one judged."""
        if identity(os.lstat(name, dir_fd=inbox_fd)) != judged:
            raise Replaced(name, given_back=False)

    @staticmethod
    def _give_back(name: str, target: Path, inbox_fd: int) -> None:
        """Rename an entry claimed in place of the one judged back into the inbox, and raise :class:`Replaced`;
        if the name was taken again meanwhile (a third entry), it is kept, with a warning."""
        try:
            rename_noreplace(target, name, dest_dir_fd=inbox_fd)
        except OSError as exc:
            log.warning("claim.raced", item=name, batch=target.parent.name, error=str(exc),
                        hint="an entry that came under the name of one just claimed by another process could not be "
                             "given back to the inbox (a third entry of that name within a moment): it is decided "
                             "as it is, and may have been taken while still being written")
            return
        raise Replaced(name, given_back=True)

    @staticmethod
    def entries(batch_dir: Path) -> list[Claim]:
        """The claims still lying in ``batch_dir`` (hidden names are the daemon's own files)."""
        try:
            arrived = int(batch_dir.name.split("-", 1)[0]) / 1e6
        except ValueError:
            arrived = time.time()
        return [Claim(e.name, e, batch_dir, arrived)
                for e in sorted(batch_dir.iterdir()) if not e.name.startswith(".")]

    def adopt_orphans(self) -> list[Path]:
        """Move batch folders of daemons that are no longer running into ours; return them, oldest first.

        A folder directly under ``claims/`` without a ``.lock`` is taken as a batch folder itself
        (left by an older layout, or by a daemon killed between creating and locking its folder).
        """
        adopted: list[Path] = []
        try:
            others = [p for p in self.base.iterdir() if _real_dir(p) and p != self.owner]
        except FileNotFoundError:
            return adopted
        for other in others:
            if not (other / LOCK_NAME).exists():
                if not owner_alive(other.name):  # a live daemon's lock removed (a cleaner of old files)
                    adopted += self._adopt(other)
                continue
            fd = _lock_if_dead(other)
            if fd is None:
                continue
            try:
                for batch in sorted(p for p in other.iterdir() if _real_dir(p) and not p.name.startswith(".")):
                    adopted += self._adopt(batch)
                shutil.rmtree(other, ignore_errors=True)
            finally:
                os.close(fd)
        return sorted(adopted, key=lambda p: p.name)

    def recover(self, router: Router, inbox: Path, progress: Callable[[], None] = lambda: None,
                decided: Callable[[dict], None] = lambda record: None) -> Iterator[list[Claim]]:
        """Adopt the batch folders of stopped daemons; finish what they decided; yield what is left to route.

        A batch with a journal was decided before the crash: exactly that decision is finished
        (items placed, missing records written) and each of its records is passed to ``decided``
        (the stopped daemon reports a batch's decisions only once the batch is done), but those a run that
        kept the batch reported already. A batch with files that still cannot be moved stays as it is. Its folder
        entries' empty shells are removed; anything else, and the entries of a batch without a
        journal, are yielded (one list per batch folder) to be routed again. Outputs of undecided
        batches are dropped. ``progress`` is called as a large journal runs and after each batch folder.
        """
        for batch_dir in self.adopt_orphans():
            progress()
            journal = read_journal(batch_dir)
            if journal is not None:
                done = journal.run(router, batch_dir, progress)
                log.info("claim.finished", batch=batch_dir.name, steps=len(done))
                for step in journal.unreported(done):
                    decided(step.record)
                if journal.stuck:  # kept whole until its files can be moved: never routed again
                    journal.keep(batch_dir, done)
                    continue
                for name in journal.entries:
                    entry = batch_dir / name
                    if entry.is_dir() and not entry.is_symlink():
                        prune_empty(entry)
            drop_undecided(batch_dir, keep=TRIES_PREFIX)
            claims = self.entries(batch_dir)
            if not claims:
                remove_batch(batch_dir, inbox)
                continue
            for claim in claims:
                log.info("claim.recovered", item=claim.name, batch=batch_dir.name)
            yield from self._tried_again(batch_dir, claims, inbox)

    def _tried_again(self, batch_dir: Path, claims: list[Claim], inbox: Path) -> Iterator[list[Claim]]:
        """The entries of an undecided batch folder a process died in, to route again: whole the first time,
        then one entry per batch folder; an entry alone in its batch folder that processes died on
        :data:`MAX_TRIES_ALONE` times more is rejected (``crashed``) without being opened. A death that an
        entry did not cause (a SIGKILL, a power cut) costs it nothing unless it recurs on it alone.
        Each try is counted durably before it begins."""
        tries = _tries(batch_dir)
        if len(claims) == 1 and tries >= MAX_TRIES_ALONE:
            claim = claims[0]
            claim.error = Crashed(f"a process of the daemon died {tries + 1} times while deciding {claim.name}, the "
                                  "last time with it alone (more memory than the daemon may use, or a crash in a "
                                  "decoder); it is not tried again")
            log.error("claim.crashed", item=claim.name, batch=batch_dir.name, deaths=tries + 1)
            yield claims
            return
        if tries == 0 or len(claims) == 1:
            self._begin_try(batch_dir, tries + 1)
            yield claims
            return
        alone = []
        for claim in claims:  # which entry it is cannot be told: each gets a batch folder of its own
            single = self.new_batch(claim.arrived)
            _count_try(single, tries)
            os.rename(claim.path, single / claim.name)
            alone.append(Claim(claim.name, single / claim.name, single, claim.arrived))
        log.warning("claim.split", batch=batch_dir.name, entries=len(alone), deaths=tries + 1)
        remove_batch(batch_dir, inbox)
        for claim in alone:
            self._begin_try(claim.batch_dir, tries + 1)
            yield [claim]

    def _begin_try(self, batch_dir: Path, n: int) -> None:
        _count_try(batch_dir, n)
        self._begun[batch_dir] = n

    def stopped_in_order(self) -> None:
        """This process stops in order (a full disk, a stop asked while a batch was in hand), not by a death:
        the tries it began are not counted, so a full disk outlasting restarts rejects nothing as crashed."""
        for batch_dir, n in self._begun.items():
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(batch_dir / f"{TRIES_PREFIX}{n}")
                with contextlib.suppress(OSError):
                    fsync_dir(batch_dir)
        self._begun.clear()

    def _adopt(self, batch: Path) -> list[Path]:
        target = self.owner / batch.name
        try:
            os.rename(batch, target)
        except FileNotFoundError:  # another daemon adopted it first
            return []
        return [target]


def _moved_unchanged(moved: os.stat_result, judged: Identity) -> bool:
    """Whether the entry just renamed into a batch folder (``moved``, its ``lstat`` there) is the one judged. A
    folder's own size or time may change as it moves (XFS stores its parent's inode number in it, in 4 or 8
    bytes; f2fs sets its modification time): only its inode is compared."""
    if stat.S_ISDIR(moved.st_mode):
        return (moved.st_dev, moved.st_ino) == (judged.dev, judged.ino)
    return identity(moved) == judged


def _tries(batch_dir: Path) -> int:
    """How many tries of ``batch_dir`` began after a process died in it (its ``.tries-N`` files)."""
    counts = [int(e.name[len(TRIES_PREFIX):]) for e in os.scandir(batch_dir)
              if e.name.startswith(TRIES_PREFIX) and e.name[len(TRIES_PREFIX):].isdigit()]
    return max(counts, default=0)


def _count_try(batch_dir: Path, n: int) -> None:
    """Record, durably, that try ``n`` of ``batch_dir`` begins."""
    if n > 0 and not (batch_dir / f"{TRIES_PREFIX}{n}").exists():
        write_durably(batch_dir / f"{TRIES_PREFIX}{n}", b"")
        fsync_dir(batch_dir)


def _real_dir(path: Path) -> bool:
    """A folder itself, not a link to one (a link planted in ``claims/`` would lead adoption out of the root)."""
    return path.is_dir() and not path.is_symlink()


def owner_name() -> str:
    """A folder name for this process: ``HOST-PID-HEX`` (claims and metrics folders alike)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def owner_alive(name: str) -> bool | None:
    """Whether the process that :func:`owner_name` named ``name`` still runs: None where that cannot be told
    (another machine's, or not such a name)."""
    host, _, pid = name.rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def _lock_if_dead(owner: Path) -> int | None:
    """An fd holding ``owner``'s lock if its daemon is gone, else None."""
    try:
        fd = os.open(owner / LOCK_NAME, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
