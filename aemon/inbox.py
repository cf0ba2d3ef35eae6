"""The inbox: watch it and decide when each entry is complete (the taking rule).

Watchdog's reader thread only classifies events and queues them (:mod:`aemon.watch`); the daemon
loop does the rest.
Watchers report changes, not state, so the inbox is also scanned at start-up and every
``rescan_seconds``. An entry is complete when:

* it was renamed into ``inbox/`` (a careful writer's publish step): at once;
* otherwise, nothing in it is open for writing (every file written to since the daemon started
  watching was closed again) and the daemon has seen nothing in it change for ``settle_seconds``
  (the files' own times are not trusted: copies keep their source's).

A folder is published the same way: renamed in when full (taken at once), or filled in place
(taken once settled). A folder with no file in it is taken (and rejected as empty) only once unchanged
for ``stuck_open_seconds``: folders are made before they are filled.

With the polling observer (network filesystems) there are no open/close events and only the
settle time applies. If a close event was lost (an inotify queue overflow), an entry unchanged
for ``stuck_open_seconds`` is taken anyway, with a warning.
"""

from __future__ import annotations

import errno
import heapq
import os
import queue
import stat
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.polling import PollingObserver

from aemon.claims import Claim, ClaimStore, Identity, Replaced, identity
from aemon.logs import get_logger
from aemon.watch import TreeWatch
from aemon.writers import writers_of

__all__ = ["EVENT_GRACE_SECONDS", "IGNORED_SUFFIXES", "is_ignored", "Inbox", "Taken"]

#: Endings of names that are still being written and are never taken.
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")
#: ``inbox.unwatched`` is logged at most this often (a tree past the kernel's limit refuses every folder).
UNWATCHED_LOG_SECONDS = 60.0

log = get_logger()

# Event kinds queued by the watchdog thread.
_MOVED_IN, _CREATED, _WRITING, _CLOSED, _CHANGED = "moved_in", "created", "writing", "closed", "changed"
# A folder renamed in: complete by its rename, unless a process is seen writing a file inside it.
_FOLDER_MOVED_IN = "folder_moved_in"
# An entry of the inbox itself renamed out or deleted (claimed by another process, moved away by a user).
_GONE = "gone"
# A folder renamed away (told apart from files by the watch: inside an entry it becomes _RELIST).
_FOLDER_GONE = "folder_gone"
# A folder renamed inside a folder entry: the paths of its files changed, those seen open among them too.
_RELIST = "relist"
# Listed by a scan, not told by inotify.
_LISTED = "listed"
#: An entry only listed by a scan waits this long before it may be taken: after a stall of the process
#: (a pause, CPU starvation) the scan can run before the reader thread has passed on the events that came
#: meanwhile, and a file written in place and paused looked settled and closed (taken half written).
EVENT_GRACE_SECONDS = 0.25
#: An entry renamed back into the inbox this soon after it left unfinished (settling, or with files open for
#: writing) is the one its writer still writes: a claim given back (its name was reused the moment another
#: process claimed the first entry). It keeps its open files and settles; it is not complete by the rename. Ample
#: for a claimer paused between its rename out and its rename back (2.5 s in a helper's attack took a file).
RETURN_SECONDS = 10.0
#: A walk of ``/proc`` is followed by a pause this many times as long before the next: walks never take more
#: than a fifth of a core (40,000 open files elsewhere on the machine made each take 0.15 s, and 300 folders
#: renamed in one by one cost 46 CPU-seconds instead of 3).
WALK_SHARE_INVERSE = 5


def is_ignored(name: str) -> bool:
    """True for names the contract says are never taken (hidden, partial, backup)."""
    return name.startswith(".") or name.endswith("~") or name.lower().endswith(IGNORED_SUFFIXES)


class Taken(NamedTuple):
    """An entry judged complete, to be claimed."""

    name: str
    #: When it was first seen in the inbox (epoch seconds).
    arrived: float
    #: The entry judged: only it is claimed, not another put under its name since.
    identity: Identity


class _Signature(NamedTuple):
    """What changes while an entry is written: a file or a whole folder."""

    entries: int
    size: int
    #: Newest modification time in ns.
    newest: int
    #: Entries that are not folders (files, links).
    files: int
    #: The entry itself (a new one under its name is another entry).
    identity: Identity


@dataclass
class _Candidate:
    sig: _Signature | None
    since: float
    arrived: float
    moved_in: bool = False
    open_files: set[str] = field(default_factory=set)
    #: Monotonic time before which no process table check is made again for this entry.
    next_check: float = 0.0
    #: Known from a scan only: no inotify event about it has been seen yet.
    listed_only: bool = False
    #: When this process first saw it (epoch seconds); ``arrived`` is earlier for an entry found by a scan.
    seen: float = 0.0
    #: The last check of ``/proc`` listed every process and saw one holding a file of it open for writing.
    writer_seen: bool = False
    #: ``inbox.held_open`` was logged for it.
    held_said: bool = False
    #: Polled and changed since its files were listed: they are listed again once it has settled.
    relist: bool = False
    #: Another entry was under its name before (another inode): events of that one may still come (a close, a
    #: rename in) and speak for this one, so ``/proc`` is asked at every look that could find it complete.
    started_over: bool = False


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        inbox = self._inbox
        if isinstance(event, FileMovedEvent | DirMovedEvent):
            if event.src_path:
                inbox.notify(os.fsdecode(event.src_path), _GONE)
            if event.dest_path:
                inbox.notify(os.fsdecode(event.dest_path),
                             _FOLDER_MOVED_IN if isinstance(event, DirMovedEvent) else _MOVED_IN)
        elif isinstance(event, FileClosedEvent):
            inbox.notify(os.fsdecode(event.src_path), _CLOSED)
        elif isinstance(event, FileModifiedEvent):
            inbox.notify(os.fsdecode(event.src_path), _WRITING)
        elif isinstance(event, FileCreatedEvent):
            inbox.notify(os.fsdecode(event.src_path), _CREATED)
        elif event.event_type == "deleted":
            inbox.notify(os.fsdecode(event.src_path), _GONE)
        elif event.event_type not in ("opened", "closed_no_write"):
            inbox.notify(os.fsdecode(event.src_path), _CHANGED)


#: Longest stretch (seconds) a batch waits to fill without looking at the stop flag and beating.
WAIT_SLICE = 0.25


class Inbox:
    """Discovers entries of ``root/inbox`` and says which are complete.

    Args:
        root: The daemon's root folder.
        settle_seconds: An entry written in place is taken once closed and unchanged this long.
        rescan_seconds: Full scan interval, the safety net for missed events.
        polling: Use watchdog's polling observer (network filesystems) instead of inotify.
        stuck_open_seconds: Take an entry unchanged this long even if no close event was seen.
        share: ``(index, count)`` of this process among the processes of one ``aemon run``.
    """

    def __init__(self, root: Path, settle_seconds: float = 1.0, rescan_seconds: float = 5.0,
                 polling: bool = False, stuck_open_seconds: float | None = None,
                 share: tuple[int, int] | None = None) -> None:
        self.root = Path(root)
        self.dir = self.root / "inbox"
        self._prefix = os.path.join(str(self.dir), "")
        self.settle_seconds = settle_seconds
        self.rescan_seconds = rescan_seconds
        self.polling = polling
        self.stuck_open_seconds = stuck_open_seconds or max(60.0, 10 * settle_seconds)
        self.share = share if share and share[1] > 1 else None
        #: ``(entry name, kind, path below the inbox, monotonic time it was read)``.
        self._events: queue.Queue[tuple[str, str, str, float]] = queue.Queue()
        self._candidates: dict[str, _Candidate] = {}
        #: Candidate names in taking order, ``(share rank, arrival, name)``: a heap, each name once
        #: (``_queued``); an entry whose candidate is gone is dropped when it comes up. Sorting every
        #: candidate for each batch made a burst of N files cost N² log N.
        self._queue: list[tuple[int, float, str]] = []
        self._queued: set[str] = set()
        #: This take's walk of ``/proc``: the open files held for writing, and whether it saw every process.
        self._writers: tuple[set[str], bool] | None = None
        #: Entries whose files no event has told of (folders renamed in, entries found by a scan): listed once,
        #: at the next walk of ``/proc``, which says whether a process still writes one of them.
        self._unlisted: set[str] = set()
        #: Monotonic time before which no new walk of ``/proc`` is made (see :meth:`_walk`).
        self._next_walk = 0.0
        self._last_scan = float("-inf")
        self._observer = None
        self._wakeup = threading.Event()
        self._fd = -1
        self._replaced = False
        #: Entries that could not be moved (read-only folders of another user), logged once each.
        self._unmovable: set[str] = set()
        #: Folder entries with a folder inside that has no inotify watch (the kernel's limit): their files
        #: make no events, so they are taken only after a long quiet time.
        self._unwatched: set[str] = set()
        self._unwatched_logged = float("-inf")
        #: Entries this process claimed whose departure event has not been read yet: ``name -> (claims, monotonic
        #: time of the last)``. inotify keeps order, so every event of the name read before it is of the entry that
        #: left (a late close), and is dropped: it would speak for a new entry of that name (inotify only).
        self._departing: dict[str, tuple[int, float]] = {}
        self._overflowed = False
        #: Entries that left the inbox unfinished: ``name -> (monotonic time, open files)``.
        self._left_unfinished: dict[str, tuple[float, set[str]]] = {}

    # -- watchdog thread -------------------------------------------------
    def notify(self, path: str, kind: str = _CHANGED) -> None:
        """Queue an event about ``path`` for its top-level entry (called on the watchdog thread)."""
        if not path.startswith(self._prefix):
            return
        rel = path[len(self._prefix):]
        name, _, inner = rel.partition("/")
        if not name or is_ignored(name):
            return
        if inner and kind in (_FOLDER_MOVED_IN, _FOLDER_GONE):
            kind = _RELIST
        elif inner and kind in (_MOVED_IN, _GONE):
            kind = _CHANGED  # a file moved into or out of a folder entry: the folder still settles
        elif kind == _FOLDER_GONE:
            kind = _GONE
        self._events.put((name, kind, rel, time.monotonic()))
        self._wakeup.set()

    def wait(self, timeout: float) -> None:
        """Block until an event arrives or ``timeout`` seconds pass (the loop's idle sleep)."""
        self._wakeup.wait(timeout)
        self._wakeup.clear()

    def _on_unwatched(self, path: bytes) -> None:
        """A folder below the inbox got no watch (on the reader thread, or while the watches are added)."""
        full = os.fsdecode(path)
        rel = full[len(self._prefix):]
        if not full.startswith(self._prefix) or not rel:
            return
        self._unwatched.add(rel.partition("/")[0])
        now = time.monotonic()
        if now - self._unwatched_logged >= UNWATCHED_LOG_SECONDS:
            self._unwatched_logged = now
            log.warning("inbox.unwatched", folder=rel, entries=len(self._unwatched),
                        hint="the kernel refused more inotify watches: files in such folders are found by the "
                             "rescan and their entries taken only after 60 s unchanged; raise "
                             "fs.inotify.max_user_watches")

    def _on_inotify(self, event, path: bytes) -> None:
        """One raw inotify event (on watchdog's reader thread): its kind, as :class:`_Handler` tells them."""
        if event.is_moved_to:
            kind = _FOLDER_MOVED_IN if event.is_directory else _MOVED_IN
        elif event.is_moved_from:
            kind = _FOLDER_GONE if event.is_directory else _GONE
        elif event.is_delete:
            kind = _GONE
        elif event.is_directory:
            if not event.is_create:
                return  # a folder's own modification or attributes: its entries' events say it all
            kind = _CHANGED
        elif event.is_close_write:
            kind = _CLOSED
        elif event.is_modify:
            kind = _WRITING
        elif event.is_create:
            kind = _CREATED
        else:
            return  # attributes, the watched folder itself
        self.notify(os.fsdecode(path), kind)

    def _on_overflow(self) -> None:
        """The kernel dropped events: scan the whole inbox at the next take."""
        log.warning("inbox.overflow", hint="inotify dropped events; the inbox is scanned again")
        self._overflowed = True  # a departure event may be among those dropped
        self._last_scan = float("-inf")
        self._wakeup.set()

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Open the inbox folder (entries are listed and claimed through it, never through its path again)
        and start watching: inotify (:mod:`aemon.watch`), or watchdog's polling observer.

        Raises:
            OSError: the inbox is a link or not a folder.
        """
        self._open()
        self._watch()

    def _watch(self) -> None:
        if not self.polling:
            watch = TreeWatch(self.dir, self._on_inotify, self._on_overflow, self._on_unwatched)
            try:
                watch.start()
                self._observer = watch
                return
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                watch.stop()
                error = str(exc)
            self.polling = True  # files are then taken once unchanged for the settle time, as on NFS
            log.warning("inbox.polling", error=error,
                        hint="no inotify instance left for this user (fs.inotify.max_user_instances, shared by "
                             "every process of the user): the inbox is polled instead; raise the limit, or set "
                             "AEMON_POLLING=true to choose polling")
        observer = PollingObserver(timeout=0.5)
        # Only what the taking rule needs: no delete or attribute events.
        wanted = [FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent, FileModifiedEvent, FileClosedEvent]
        observer.schedule(_Handler(self), str(self.dir), recursive=True, event_filter=wanted)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _unwatch(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def stop(self) -> None:
        """Stop watching, join the watcher's thread and close the inbox folder."""
        self._unwatch()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open_folder(self) -> int:
        """A descriptor of the folder at the inbox path; OSError if it is a link, a file or nothing."""
        return os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def _open(self) -> None:
        if self._fd < 0:
            self._fd = self._open_folder()

    def _reopen(self) -> bool:
        """Take from a new real folder at the inbox path (the inbox deleted and made again, or moved away
        and another made); False while the path is a link, a file or nothing."""
        try:
            fd = self._open_folder()
        except OSError:
            return False
        os.close(self._fd)
        self._fd = fd
        watching = self._observer is not None
        self._unwatch()
        if watching:
            self._watch()
        self._last_scan = float("-inf")  # what is already in the new folder is found by a scan
        log.warning("inbox.reopened", inbox=str(self.dir), hint="the inbox folder was replaced by a new folder; "
                    "entries are taken from the new one")
        return True

    def intact(self) -> bool:
        """True while the inbox path is still the folder opened at start-up (not replaced, e.g. by a link)."""
        try:
            now, opened = os.lstat(self.dir), os.fstat(self._fd)
        except OSError:
            return False
        return stat.S_ISDIR(now.st_mode) and (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)

    # -- loop thread -----------------------------------------------------
    def gather(self, store: ClaimStore, size: int, wait: float, stop: Callable[[], bool],
               claimed: Callable[[int], None], waiting: Callable[[], None] = lambda: None) -> list[Claim]:
        """Claim up to ``size`` complete entries into one new batch folder, waiting up to ``wait`` seconds.

        A name already in the batch folder (dropped again meanwhile) waits for the next batch:
        one batch folder never holds two entries of one name.

        Args:
            store: This daemon's claims.
            size: Most entries in the batch.
            wait: Longest wait for the batch to fill once it has one entry.
            stop: True when the daemon is stopping (stop waiting).
            claimed: Called with the number of entries claimed, as they are claimed.
            waiting: Called at least every :data:`WAIT_SLICE` seconds while waiting (the daemon's heartbeat
                and gauges: a wait of up to a minute is the loop at work, not stalled).
        """
        taken = self.take(size)
        if not taken:
            return []
        batch_dir = store.new_batch(min(t.arrived for t in taken))
        names: set[str] = set()
        claims = self.claim_taken(store, taken, batch_dir, names, claimed)
        deadline = time.monotonic() + wait
        while len(claims) < size and time.monotonic() < deadline and not stop():
            self.wait(min(WAIT_SLICE, max(0.0, deadline - time.monotonic())))
            claims += self.claim_taken(store, self.take(size - len(claims)), batch_dir, names, claimed)
            waiting()
        if not claims:
            batch_dir.rmdir()
        return claims

    def claim_taken(self, store: ClaimStore, taken: list[Taken], batch_dir: Path, names: set[str],
                    claimed: Callable[[int], None]) -> list[Claim]:
        """Claim the ``taken`` entries into ``batch_dir``, whose names are ``names`` (added to); call ``claimed``
        with how many were. An entry gone meanwhile is dropped; another entry found under the name of one that
        was judged is tracked again from the start."""
        claims = []
        for name, arrived, judged in taken:
            if name in names:  # the same name dropped again: never rename over the first
                self.put_back(name, arrived)
                continue
            try:
                claim = store.claim(name, self._fd, batch_dir, arrived, judged)
            except Replaced as exc:
                log.info("inbox.entry_replaced", item=name, given_back=exc.given_back,
                         hint="not the entry judged complete (another came under its name, one that another process "
                              "claimed, or it was written to since): it settles from now")
                self._track_again(name)
                continue
            except OSError as exc:  # stays in the inbox; tried again at each rescan, logged once
                if not isinstance(exc, PermissionError) and exc.errno not in (errno.EBUSY, errno.EXDEV):
                    raise
                if name not in self._unmovable:
                    self._unmovable.add(name)
                    log.error("inbox.unmovable", item=name, error=str(exc),
                              hint="the entry cannot be moved out of the inbox (a read-only folder of another "
                                   "user, another user's file in a sticky inbox, an immutable or append-only file: "
                                   "chattr +i/+a, a mount point, or a folder of an overlay's lower layer, as in a "
                                   "container image); make it movable or drop a copy")
                continue
            self._unmovable.discard(name)
            if claim is not None:
                names.add(name)
                claims.append(claim)
                if not self.polling:
                    self._departing[name] = (self._departing.get(name, (0, 0.0))[0] + 1, time.monotonic())
        claimed(len(claims))
        return claims

    def put_back(self, name: str, arrived: float) -> None:
        """Track a taken entry again, complete (the caller could not claim it into this batch)."""
        self._candidates[name] = _Candidate(None, time.monotonic(), arrived, moved_in=True)
        self._enqueue(name, arrived)

    def _track_again(self, name: str) -> None:
        """Track ``name`` anew: it settles from now, and its files are looked up in ``/proc``."""
        self._enqueue(name, self._start_over(name).arrived)

    def _start_over(self, name: str) -> _Candidate:
        """A new candidate for ``name``, whatever was known of an entry under that name before (another inode: the
        events that told of the old may be all that came, those of the new still on their way): it settles from
        now, and its files are looked up in ``/proc``."""
        seen = time.time()
        cand = self._candidates[name] = _Candidate(None, time.monotonic(), seen, seen=seen, started_over=True)
        self._unlisted.add(name)
        return cand

    def pending(self) -> int:
        """Entries seen in the inbox and not yet taken, those that cannot be moved out of it included."""
        return len(self._candidates) + sum(name not in self._candidates for name in self._unmovable)

    def idle(self) -> bool:
        """True when no event is queued and no entry is waiting."""
        return self._events.empty() and not self._candidates

    def scan(self) -> None:
        """Queue every takeable entry of the inbox (start-up and the periodic safety net)."""
        self._last_scan = time.monotonic()
        try:
            names = os.listdir(self._fd)
        except OSError:
            return
        self._unmovable &= set(names)  # an unmovable entry removed meanwhile waits no more
        for name in sorted(names):  # entries first seen together are taken in name order
            if not is_ignored(name):
                self._events.put((name, _LISTED, name, self._last_scan))

    def take(self, limit: int) -> list[Taken]:
        """Up to ``limit`` complete entries, first seen first.

        They are no longer tracked: the caller claims them (:meth:`claim_taken`).
        """
        self._open()
        if not self.intact() and not self._reopen():
            if not self._replaced:
                log.error("inbox.replaced", inbox=str(self.dir),
                          hint="the inbox path is no longer a folder (a link or a file was put there, or it was "
                               "removed): nothing is taken until a real folder is back; aemon never follows links "
                               "out of its root")
            self._replaced = True
            return []
        self._replaced = False
        now = time.monotonic()
        if now - self._last_scan >= self.rescan_seconds:
            self.scan()
        self._drain(now)
        self._writers = None  # walked at most once in this take, when an entry needs it
        out: list[Taken] = []
        looked: list[tuple[int, float, str]] = []
        try:
            while self._queue and len(out) < limit:
                entry = heapq.heappop(self._queue)
                looked.append(entry)
                if entry[2] in self._candidates and self._complete(entry[2], now):
                    cand = self._candidates.pop(entry[2])
                    out.append(Taken(entry[2], cand.arrived, cand.sig.identity))
        finally:  # entries still waiting go back in the queue, whatever happened
            for entry in looked:
                if entry[2] in self._candidates:
                    heapq.heappush(self._queue, entry)
                else:
                    self._queued.discard(entry[2])
        return out

    def _arrival(self, name: str, seen: float) -> float:
        """When an entry found by a scan reached the inbox: its inode's change time (set by the rename or the
        last write that put it there, which no copying tool can set back), at most ``seen``. An item that waited
        while no daemon ran counts that wait in its latency and ``received_at``."""
        try:
            return min(seen, os.lstat(name, dir_fd=self._fd).st_ctime)
        except (OSError, TypeError):
            return seen

    def _enqueue(self, name: str, arrived: float) -> None:
        """Queue a new candidate by its arrival: first seen, first taken (in name order alone, a name sorting
        late waited as long as earlier-sorting names kept coming); with several processes on one inbox, each
        first tries its own share of the names (by a hash), so that they rarely race to claim one."""
        if name in self._queued:
            return
        self._queued.add(name)
        rank = 0
        if self.share is not None:
            index, count = self.share
            rank = (zlib.crc32(name.encode("utf-8", "surrogateescape")) - index) % count
        heapq.heappush(self._queue, (rank, arrived, name))

    def _drain(self, now: float) -> None:
        track_writes = not self.polling
        if self._overflowed:  # a departure event may be among those dropped
            self._overflowed = False
            self._departing.clear()
        while True:
            try:
                name, kind, rel, when = self._events.get_nowait()
            except queue.Empty:
                return
            if name in self._departing and kind != _LISTED and self._before_departure(name, kind, when):
                continue
            if kind == _GONE:
                # Forgotten at once: a name written again in place must wait for its writer, not count as
                # the copy renamed in before (its queue entry is dropped when it comes up, or reused).
                self._left(name, self._candidates.pop(name, None), when)
                self._unmovable.discard(name)
                self._unwatched.discard(name)
                self._unlisted.discard(name)
                continue
            cand = self._candidates.get(name)
            if cand is None:
                seen = time.time()
                cand = self._candidates[name] = _Candidate(None, now, seen, listed_only=kind == _LISTED, seen=seen)
                self._enqueue(name, seen)
                # There before the watch, or its events still on the way, or polled (no open or close events
                # at all), or first told of by an event that is not its beginning (a late close of an entry
                # already taken, under whose name a new one is being written): its files are looked up in
                # /proc once it has settled.
                if kind not in (_CREATED, _MOVED_IN, _FOLDER_MOVED_IN) or not track_writes:
                    self._unlisted.add(name)
                if kind == _LISTED:
                    cand.arrived = self._arrival(name, seen)  # it may have waited while no daemon ran
            elif kind != _LISTED:
                cand.listed_only = False
            if kind in (_MOVED_IN, _FOLDER_MOVED_IN) and self._returned(name, cand, when):
                self._unlisted.add(name)  # and not complete by the rename
            elif kind in (_MOVED_IN, _FOLDER_MOVED_IN):
                cand.moved_in = True
                if kind == _FOLDER_MOVED_IN:
                    self._unlisted.add(name)
            elif kind == _WRITING and track_writes:
                cand.open_files.add(rel)
            elif kind == _CREATED and track_writes and _is_regular(self.dir / rel):
                # Created in place: open until closed, even before its first byte is written.
                cand.open_files.add(rel)
            elif kind == _CLOSED:
                cand.open_files.discard(rel)
            elif kind == _RELIST:
                # The files seen open below the folder's old path are known by that path no more, and one of
                # them may be written on under its new one (where /proc shows its writer): the entry's files
                # are listed again and looked up in /proc before it is taken.
                below = rel + "/"
                cand.open_files = {f for f in cand.open_files if not f.startswith(below)}
                self._unlisted.add(name)

    def _before_departure(self, name: str, kind: str, when: float) -> bool:
        """Whether an event of ``name``, which this process claimed, is the claim's own departure or came before
        it (of the entry claimed, not of a new one under its name). A claim is forgotten after an overflow, or
        :data:`RETURN_SECONDS` without its departure event."""
        count, since = self._departing[name]
        if when - since > RETURN_SECONDS:
            del self._departing[name]
            return False
        if kind == _GONE:
            if count > 1:
                self._departing[name] = (count - 1, since)
            else:
                del self._departing[name]
        return True

    def _left(self, name: str, cand: _Candidate | None, when: float) -> None:
        """Remember for :data:`RETURN_SECONDS` an entry that left the inbox unfinished (not renamed in, or with
        files open for writing), with its open files; ``when``: the time its event was read (the events of one
        reader come in order). An entry taken complete has no candidate left."""
        while self._left_unfinished and when - next(iter(self._left_unfinished.values()))[0] > RETURN_SECONDS:
            del self._left_unfinished[next(iter(self._left_unfinished))]  # oldest first: added in time order
        self._left_unfinished.pop(name, None)
        if cand is not None and (not cand.moved_in or cand.open_files):
            self._left_unfinished[name] = (when, cand.open_files)

    def _returned(self, name: str, cand: _Candidate, when: float) -> bool:
        """Whether ``name``, renamed in, left unfinished a moment ago (a claim given back): it then takes back the
        files it had open, to wait for their writers, and settles like an entry written in place."""
        left = self._left_unfinished.pop(name, None)
        if left is None or when - left[0] > RETURN_SECONDS:
            return False
        cand.open_files |= left[1]
        return True

    def _written(self, cand: _Candidate) -> bool | None:
        """Whether a process still holds one of ``cand``'s open files for writing: True (seen in a ``/proc`` that
        lists every process), False (not seen there), None (cannot tell: not walked yet, or ``/proc`` hides
        processes). One walk per take answers for every entry (a walk per entry made N files held open cost N²
        each settle time)."""
        walk = self._walk()
        if walk is None:
            return None
        found, complete = walk
        return any(os.path.join(self._prefix, rel) in found for rel in cand.open_files) if complete else None

    def _walk(self) -> tuple[set[str], bool] | None:
        """This take's walk of ``/proc`` for the open files of every candidate. Entries listed since the last
        walk first add their files, and keep those a process is seen writing (each entry is listed once).

        None when the last walk was too recent for what it cost: a machine with tens of thousands of open
        files makes a walk take a tenth of a second, and entries needing one (folders renamed in, entries found
        by a scan, writers not seen closing) wait for the next instead of spending more than a fifth of a core.
        """
        now = time.monotonic()
        if self._writers is not None and not self._unlisted:
            return self._writers
        if now < self._next_walk:
            return None
        listed: dict[str, set[str]] = {}
        for name in self._unlisted:
            if name in self._candidates:
                cand = self._candidates[name]
                listed[name] = set(_files_of(self.dir, name)) - cand.open_files
                cand.open_files |= listed[name]
        self._unlisted.clear()
        paths = [os.path.join(self._prefix, rel) for c in self._candidates.values() for rel in c.open_files]
        self._writers = writers_of(paths)
        self._next_walk = now + WALK_SHARE_INVERSE * (time.monotonic() - now)
        found = self._writers[0]
        for name, files in listed.items():
            self._candidates[name].open_files -= {rel for rel in files if os.path.join(self._prefix, rel) not in found}
        return self._writers

    def _moved_in_complete(self, name: str, cand: _Candidate, now: float) -> bool:
        """A renamed-in entry is complete, unless it is a folder in which a process is seen writing a file:
        one that kept a handle on the folder (its working directory) writes on after the rename, and the
        daemon's own return of files added to a claimed folder is such a folder. Where ``/proc`` cannot
        show every process, the rename is trusted; a file left unchanged for the stuck-open time is taken."""
        if name not in self._unlisted and not cand.open_files:
            return True
        if now < cand.next_check:
            return False
        walk = self._walk()
        if walk is None:
            return False
        found, complete = walk
        cand.open_files = {rel for rel in cand.open_files if os.path.join(self._prefix, rel) in found}
        if not cand.open_files:
            return True
        cand.writer_seen = complete
        if self._stuck_open(name, cand, now):
            return True
        cand.next_check = now + max(self.settle_seconds, 0.5)
        return False

    def _stuck_open(self, name: str, cand: _Candidate, now: float) -> bool:
        """Whether an entry with files still seen open has been unchanged for the stuck-open time: taken then,
        with a warning (a lost close event), unless ``/proc`` shows a process holding one of them for writing:
        a writer paused mid-file is waited for however long, said once as ``inbox.held_open``."""
        if now - cand.since < self.stuck_open_seconds:
            return False
        if cand.writer_seen:
            if not cand.held_said:
                cand.held_said = True
                log.warning("inbox.held_open", item=name, open=sorted(cand.open_files),
                            unchanged_seconds=round(now - cand.since, 1),
                            hint="a process holds it open for writing: it is taken once closed")
            return False
        log.warning("inbox.taken_without_close", item=name, open=sorted(cand.open_files),
                    unchanged_seconds=round(now - cand.since, 1))
        return True

    def _empty_waits(self, name: str, cand: _Candidate, sig: _Signature, now: float) -> bool:
        """Whether ``name`` is a folder with no file in it that has not yet been unchanged for the stuck-open
        time. A folder is made before it is filled (``rsync --temp-dir``, ``mkdir`` then ``cp``), and taken
        empty it was rejected while its files were still to come (they then landed in ``rejected/`` with no
        record); waiting for an empty folder delays no image."""
        if sig.files or now - cand.since >= self.stuck_open_seconds:
            if not sig.files:
                log.info("inbox.taken_empty", item=name, unchanged_seconds=round(now - cand.since, 1))
            return False
        return True

    def _too_soon(self, name: str, cand: _Candidate, now: float) -> bool:
        """Whether no look at the entry now could find it complete: written in place and changed less than a
        settle time ago, or renamed in and waiting for its next look in ``/proc``. Its files are then not walked
        (a folder of 10,000 files being filled was walked by both processes at each event: most of a core)."""
        if cand.sig is None:
            return False
        if cand.moved_in:
            return (name in self._unlisted or bool(cand.open_files)) and now < cand.next_check
        return now - cand.since < self.settle_seconds

    def _complete(self, name: str, now: float) -> bool:
        cand = self._candidates[name]
        if self._too_soon(name, cand, now):
            return False
        sig = _signature(self.dir / name)
        if sig is None:
            self._left(name, self._candidates.pop(name), now)
            self._unlisted.discard(name)
            self._unwatched.discard(name)
            return False
        if cand.sig is not None and sig.identity[:2] != cand.sig.identity[:2]:
            cand = self._start_over(name)
        if sig != cand.sig:
            cand.sig, cand.since = sig, now
            cand.relist = self.polling  # no event tells of a file begun in it: its files are listed again
        if self._empty_waits(name, cand, sig, now):
            return False
        if cand.started_over:
            self._unlisted.add(name)
        if cand.moved_in:
            return self._moved_in_complete(name, cand, now)
        # Only time seen unchanged counts, never the files' own times: rsync -a, cp -p and tar set them to the
        # source's, and a folder being filled so looked quiet for hours (taken between two files).
        quiet = now - cand.since
        if quiet < self.settle_seconds or (cand.listed_only and not self.polling
                                           and time.time() - cand.seen < EVENT_GRACE_SECONDS):
            return False
        if cand.relist:  # once settled: a folder being filled is not listed again at each change
            cand.relist = False
            self._unlisted.add(name)
        if name in self._unwatched:
            # Folders without a watch make no events at all, and /proc may not show the writer (another
            # user under ProtectProc, another container): only a long quiet time tells.
            if now - cand.since < self.stuck_open_seconds:
                return False
            log.info("inbox.taken_unwatched", item=name, unchanged_seconds=round(now - cand.since, 1))
            self._unwatched.discard(name)
            return True
        if name in self._unlisted and self._walk() is None:
            return False
        if not cand.open_files:
            return True
        if now >= cand.next_check:
            # No close event seen: ask the process table whether anyone still writes these files
            # (a hard link has no open and close; a close event may have been lost in an overflow).
            cand.next_check = now + max(self.settle_seconds, 0.5)
            written = self._written(cand)
            if written is False:
                log.info("inbox.taken_without_close", item=name, open=sorted(cand.open_files), checked="proc")
                return True
            cand.writer_seen = written is True
        return self._stuck_open(name, cand, now)


def _signature(path: Path) -> _Signature | None:
    """The signature of a file or a whole folder; None if gone."""
    try:
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):  # a link to a folder too: never followed
        return _Signature(1, st.st_size, st.st_mtime_ns, 1, identity(st))
    count, size, newest = 0, 0, st.st_mtime_ns
    unread: list[OSError] = []  # a folder it may not list (mode 000) may hold files: never counted empty
    files = 0
    for dirpath, dirnames, filenames in os.walk(path, onerror=unread.append):
        files += len(filenames)
        for names, as_folders in ((dirnames, True), (filenames, False)):
            for entry in names:
                try:
                    est = os.lstat(os.path.join(dirpath, entry))
                except OSError:
                    continue
                count += 1
                size += est.st_size
                newest = max(newest, est.st_mtime_ns)
                if as_folders and not stat.S_ISDIR(est.st_mode):  # a link to a folder: an entry, not a folder
                    files += 1
    return _Signature(count, size, newest, files + len(unread), identity(st))


def _files_of(inbox: Path, name: str) -> list[str]:
    """The files of the entry ``name`` of ``inbox`` (itself, or those below a folder), as paths relative to
    it; none for a link or anything else (links inside a folder are not followed)."""
    top = inbox / name
    if top.is_symlink() or not top.is_dir():
        return [name] if _is_regular(top) else []
    found: list[str] = []
    for dirpath, _, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, inbox)
        found += [os.path.join(rel, file) for file in filenames]
    return found


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
