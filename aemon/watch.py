"""inotify events of a folder tree, handed to a callback on watchdog's reader thread.

watchdog's ``InotifyObserver`` carries every event through three threads (the shared inotify
reader, an emitter, a dispatcher), a delay queue and event objects. The inbox needs much less: the
path and the kind of each event, as soon as it is read. :class:`TreeWatch` keeps watchdog's
``InotifyWatchGroup``, which adds and moves the watches of a recursive tree as folders come and go
and rebuilds them after a queue overflow, and replaces only its move-event grouper with a stand-in
that passes each event straight on (names are all the inbox needs, so moves are not paired).

Measured on 5,000 renamed-in PNGs with two processes on one inbox, where each process reads
every event: see the README ("The daemon", "Measured"). The stand-in relies on watchdog 7's layering
(``InotifyFD`` and ``InotifyWatchGroup``), hence the version range in ``pyproject.toml``.
"""

from __future__ import annotations

import bisect
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from watchdog.observers.inotify import InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD
from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent

__all__ = ["EVENT_MASK", "TreeWatch"]

# A folder renamed inside the tree (a hidden upload folder made visible): moves are not paired, so the
# group adds the watches of the folder's subtree again under their new paths, which is what points
# their events at the new paths; watchdog warns on stderr for each watch it already had ("Callback
# with id ... already exists"), lines that would break a JSON log.
warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning,
                        module="watchdog")

#: Seconds a folder renamed away keeps its watches: time for its IN_MOVED_TO to show it was renamed within the tree.
LEAVE_SECONDS = 1.0

#: What the taking rule needs: entries made, renamed in or out, written to, closed after writing, deleted.
EVENT_MASK = (InotifyConstants.IN_CREATE | InotifyConstants.IN_MOVE | InotifyConstants.IN_MODIFY
              | InotifyConstants.IN_CLOSE_WRITE | InotifyConstants.IN_DELETE | InotifyConstants.IN_DELETE_SELF)


class _PassOn:
    """Stands in for watchdog's ``InotifyMoveEventGrouper``: every event goes to ``on_event`` at once."""

    def __init__(self, on_event: Callable[[InotifyEvent, bytes], None]) -> None:
        self._on_event = on_event

    def put_event(self, event: PathedInotifyEvent) -> None:
        self._on_event(event.ev, event.path)

    def get_queued_moved_from_event(self, cookie: int) -> None:
        return None  # moves are not paired: a rename in is a rename in, wherever it came from

    def read_event(self) -> None:
        return None

    def discard_pending_events(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Group(InotifyWatchGroup):
    # Not named on_event: that is the method through which watchdog's reader calls the group.
    forward: Callable[[InotifyEvent, bytes], None] = field(default=lambda event, path: None)
    overflowed: Callable[[], None] = field(default=lambda: None)
    unwatched: Callable[[bytes], None] = field(default=lambda path: None)

    def __post_init__(self) -> None:
        self._move_event_grouper = _PassOn(self.forward)  # before the watches exist: no event is missed
        self._leaving: dict[int, float] = {}  # watch -> when its folder was renamed away (monotonic seconds)
        # watchdog's watch -> path map as sorted (path, watch) pairs, to find a folder's subtree without a scan
        # of every watch (8,000 folders renamed in at once spent a quarter of the daemon's time in those scans).
        self._sorted: list[tuple[bytes, int]] = []
        # Each watch's path as indexed: watchdog overwrites a re-added watch's path before ours is told.
        self._path_of: dict[int, bytes] = {}
        super().__post_init__()

    def on_queue_overflow(self) -> None:
        super().on_queue_overflow()
        self.overflowed()

    def on_event(self, event: InotifyEvent) -> None:
        if event.wd in self._leaving:
            # Of a folder renamed away, whose watch still maps to its old path below the root, which another
            # folder may have taken since: passed on, its events spoke for that folder (a close hid a file it
            # had open; a subfolder renamed in the old copy marked the new one's as gone).
            self._unwatch_left()
            return
        super().on_event(event)
        if event.is_moved_from and event.is_directory:
            self._moved_away(event)
        if self._leaving:
            self._unwatch_left()

    def _moved_away(self, event: InotifyEvent) -> None:
        # A watch follows its folder's inode: a folder renamed out of the tree (claimed into .aemon/, rejected
        # whole, moved out by a person) kept its watches, its later events came under its old inbox path, and
        # folders kept in rejected/ held watches for good (fs.inotify.max_user_watches). Its watches are marked
        # here and removed a little later, unless the folder is met again below the root first: a folder
        # renamed within the tree gets its own watches back at its IN_MOVED_TO (``_add_callback``), so its
        # events never stop, not even between the two halves of the rename.
        with self._lock:
            parent = self._active_callbacks_by_watch.get(event.wd)
            if parent is None:
                return
            now = time.monotonic()
            for wd in self._watches_of(os.path.join(parent, event.name)):
                self._leaving.setdefault(wd, now)

    def _watches_of(self, path: bytes) -> list[int]:
        """The watches of the folder at ``path`` and of every folder below it (by the paths they were added at)."""
        found = []
        for prefix, exact in ((path, True), (path + b"/", False)):  # "path-x" sorts between the two ranges
            i = bisect.bisect_left(self._sorted, (prefix,))
            while i < len(self._sorted) and (self._sorted[i][0] == prefix if exact
                                             else self._sorted[i][0].startswith(prefix)):
                found.append(self._sorted[i][1])
                i += 1
        return found

    def _index(self, wd: int, path: bytes) -> None:
        """Keep ``_sorted`` the mirror of watchdog's watch -> path map after watch ``wd`` was added at ``path``."""
        old = self._path_of.get(wd)
        if old == path:
            return
        if old is not None:
            self._unindex(wd)
        self._path_of[wd] = path
        bisect.insort(self._sorted, (path, wd))

    def _unindex(self, wd: int) -> None:
        path = self._path_of.pop(wd, None)
        if path is not None:
            i = bisect.bisect_left(self._sorted, (path, wd))
            if i < len(self._sorted) and self._sorted[i] == (path, wd):
                del self._sorted[i]

    def _unwatch_left(self) -> None:
        """Remove the watches of folders renamed away over :data:`LEAVE_SECONDS` ago and not met again."""
        with self._lock:
            due = time.monotonic() - LEAVE_SECONDS
            gone = [wd for wd, since in self._leaving.items() if since <= due]
            for wd in gone:
                del self._leaving[wd]
            if gone and self.is_active:
                self._remove_callbacks(gone)

    def _remove_watch_internally(self, wd) -> None:
        # watchdog's own pops both maps unconditionally. A folder moved out of the tree keeps its watch under
        # its old path, and a new folder under that name gets another: the path is then met twice, and the
        # second pop raised KeyError, on the reader thread (ending it) or in deactivate (at stop).
        path = self._active_callbacks_by_watch.pop(wd, None)
        if path is not None and self._active_callbacks_by_path.get(path) == wd:
            del self._active_callbacks_by_path[path]
        self._unindex(wd)

    def _add_callback(self, path: bytes) -> None:
        # watchdog swallows a failure to watch a folder below the root (it may have gone meanwhile); a
        # folder still there was refused a watch (fs.inotify.max_user_watches): its files make no events.
        if self._active_callbacks_by_path.get(path) in self._leaving:
            # The path's entry is a folder renamed away: if the add below fails (a folder made and removed at
            # once under its name), the look-up after it must not take that folder for one met again.
            del self._active_callbacks_by_path[path]
        super()._add_callback(path)
        wd = self._active_callbacks_by_path.get(path)
        if wd is not None:
            if self._active_callbacks_by_watch.get(wd) == path:
                self._index(wd, path)
            self._leaving.pop(wd, None)  # the same inode, met again below the root: renamed within the tree
        if path not in self._active_callbacks_by_path and os.path.isdir(path) and not os.path.islink(path):
            self.unwatched(path)


class TreeWatch:
    """Recursive inotify watches on ``path``; ``on_event(event, path)`` runs on watchdog's reader thread.

    Args:
        path: The folder to watch, with everything below it.
        on_event: Called with each raw event and its full path (bytes); it must be quick.
        on_overflow: Called after the kernel dropped events (the caller should look at the folder again).
        on_unwatched: Called with a folder below ``path`` that got no watch (the kernel's limit of watches).
    """

    def __init__(self, path: str | os.PathLike, on_event: Callable[[InotifyEvent, bytes], None],
                 on_overflow: Callable[[], None], on_unwatched: Callable[[bytes], None] = lambda path: None) -> None:
        self.path = os.fsencode(path)
        self.on_event = on_event
        self.on_overflow = on_overflow
        self.on_unwatched = on_unwatched
        self._reader: InotifyFD | None = None
        self._group: _Group | None = None

    def start(self) -> None:
        """Open an inotify instance, start its reader thread and add the watches (events flow from now on)."""
        self._reader = InotifyFD()  # this watch's own (not watchdog's shared one): closed by stop()
        self._reader.name = "aemon-inotify"
        self._reader.start()
        self._group = _Group(self._reader, self.path, event_mask=EVENT_MASK, is_recursive=True,
                             forward=self.on_event, overflowed=self.on_overflow, unwatched=self.on_unwatched)

    def stop(self) -> None:
        """Remove every watch and close the inotify instance (its reader thread then ends)."""
        if self._group is not None:
            self._group.deactivate()
            self._group = None
        if self._reader is not None:
            self._reader.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the reader thread to end, as for watchdog's observers."""
        if self._reader is not None:
            self._reader.join(timeout)
            self._reader = None
