"""The inbox: watch it, wait until each entry has settled, claim it, recover old claims.

The watchdog thread only filters names and queues them; the daemon loop does everything
else. Watchers report changes, not state, so the inbox is also scanned at startup and every
``rescan_seconds``. An entry is claimed by ``os.rename`` into ``.aemon/claims/<unique>/``,
keeping its name, so a crash leaves it there and the next start re-queues it.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
from watchdog.observers.polling import PollingObserver

__all__ = ["IGNORED_SUFFIXES", "is_ignored", "Claim", "Inbox"]

#: Endings of names that are still being written and are never taken.
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")


def is_ignored(name: str) -> bool:
    """True for names the contract says are never taken (hidden, partial, backup)."""
    return name.startswith(".") or name.endswith("~") or name.lower().endswith(IGNORED_SUFFIXES)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Claim:
    """One inbox entry the daemon has taken and not finished."""

    #: The entry's name in ``inbox/`` (top level).
    name: str
    #: Where the entry lies now, inside its claim folder.
    path: Path
    #: ``.aemon/claims/<unique>/``; removed once the entry is routed.
    claim_dir: Path
    #: When the entry was first seen in the inbox (epoch seconds).
    arrived: float

    @property
    def received_at(self) -> str:
        """Arrival time, ISO 8601 UTC."""
        return _iso(self.arrived)

    def release(self) -> None:
        """Remove the claim folder (call once everything in it has been routed)."""
        shutil.rmtree(self.claim_dir, ignore_errors=True)


@dataclass
class _Candidate:
    sig: tuple | None
    since: float
    arrived: float


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self._inbox.notify(os.fsdecode(path))


class Inbox:
    """Discovers, settles and claims entries of ``root/inbox``.

    Args:
        root: The daemon's root folder.
        settle_seconds: An entry is taken once unchanged (or last modified) this long ago.
        rescan_seconds: Full scan interval, the safety net for missed events.
        polling: Use watchdog's polling observer (network filesystems) instead of inotify.
    """

    def __init__(self, root: Path, settle_seconds: float = 1.0, rescan_seconds: float = 5.0,
                 polling: bool = False) -> None:
        self.root = Path(root)
        self.dir = self.root / "inbox"
        self.claims_dir = self.root / ".aemon" / "claims"
        self.settle_seconds = settle_seconds
        self.rescan_seconds = rescan_seconds
        self.polling = polling
        self._events: queue.Queue[str] = queue.Queue()
        self._candidates: dict[str, _Candidate] = {}
        self._ready: deque[Claim] = deque()
        self._last_scan = float("-inf")
        self._observer = None
        self._wakeup = threading.Event()

    # -- watchdog thread -------------------------------------------------
    def notify(self, path: str) -> None:
        """Queue the top-level entry that ``path`` belongs to (called on the watchdog thread)."""
        try:
            rel = Path(path).relative_to(self.dir)
        except ValueError:
            return
        if not rel.parts:
            return
        name = rel.parts[0]
        if not is_ignored(name):
            self._events.put(name)
            self._wakeup.set()

    def wait(self, timeout: float) -> None:
        """Block until an event arrives or ``timeout`` seconds pass (the loop's idle sleep)."""
        self._wakeup.wait(timeout)
        self._wakeup.clear()

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Start the observer thread."""
        # watchdog holds every unpaired IN_MOVED_FROM for 0.5 s to pair it with an IN_MOVED_TO,
        # and its queue is FIFO: each claim (a rename out of inbox/) would delay every later
        # event by half a second. Only names matter here, so pairing is not needed.
        InotifyMoveEventGrouper.delay = 0.0
        observer = PollingObserver(timeout=0.5) if self.polling else Observer()
        observer.schedule(_Handler(self), str(self.dir), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        """Stop and join the observer thread."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def recover(self) -> list[Claim]:
        """Re-queue entries claimed by an earlier run that never finished them."""
        recovered = []
        if not self.claims_dir.is_dir():
            return recovered
        for claim_dir in sorted(self.claims_dir.iterdir()):
            if not claim_dir.is_dir():
                continue
            _finish_pending(self.root, claim_dir)
            entries = sorted(e for e in claim_dir.iterdir() if not e.name.startswith("."))
            if not entries:
                shutil.rmtree(claim_dir, ignore_errors=True)
                continue
            try:
                arrived = int(claim_dir.name.split("-", 1)[0]) / 1e6
            except ValueError:
                arrived = time.time()
            for entry in entries:
                claim = Claim(entry.name, entry, claim_dir, arrived)
                self._ready.append(claim)
                recovered.append(claim)
        return recovered

    # -- loop thread -----------------------------------------------------
    def pending(self) -> int:
        """Entries seen but not yet routed (settling or claimed)."""
        return len(self._candidates) + len(self._ready)

    def idle(self) -> bool:
        """True when nothing is waiting: no event, no settling entry, no claim."""
        return self._events.empty() and not self._candidates and not self._ready

    def scan(self) -> None:
        """Add every takeable entry of the inbox to the candidates."""
        self._last_scan = time.monotonic()
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            if not is_ignored(name):
                self._events.put(name)

    def take(self, limit: int) -> list[Claim]:
        """Claim settled entries; return up to ``limit`` claims ready to process."""
        now = time.monotonic()
        if now - self._last_scan >= self.rescan_seconds:
            self.scan()
        while True:
            try:
                name = self._events.get_nowait()
            except queue.Empty:
                break
            if name not in self._candidates:
                self._candidates[name] = _Candidate(None, now, time.time())
        for name in sorted(self._candidates):
            if len(self._ready) >= limit:
                break
            self._check(name, now)
        out = []
        while self._ready and len(out) < limit:
            out.append(self._ready.popleft())
        return out

    def _check(self, name: str, now: float) -> None:
        cand = self._candidates[name]
        path = self.dir / name
        sig = _signature(path)
        if sig is None:
            del self._candidates[name]
            return
        if sig != cand.sig:
            cand.sig, cand.since = sig, now
        newest = sig[-1] / 1e9
        if time.time() - newest >= self.settle_seconds or now - cand.since >= self.settle_seconds:
            claim = self._claim(name, cand.arrived)
            del self._candidates[name]
            if claim is not None:
                self._ready.append(claim)

    def _claim(self, name: str, arrived: float) -> Claim | None:
        claim_dir = self.claims_dir / f"{int(arrived * 1e6)}-{uuid.uuid4().hex}"
        claim_dir.mkdir(parents=True)
        target = claim_dir / name
        try:
            os.rename(self.dir / name, target)
        except FileNotFoundError:
            claim_dir.rmdir()
            return None
        return Claim(name, target, claim_dir, arrived)


def _finish_pending(root: Path, claim_dir: Path) -> None:
    """Finish records staged in ``claim_dir`` by a run that was killed while routing.

    A staged record whose item has left the claim is committed beside the item; one whose
    item is still in the claim is dropped (the item is routed again).
    """
    for pending in sorted(claim_dir.glob(".record-*.json")):
        try:
            record = json.loads(pending.read_text())
            src = claim_dir / record["item"]
            dest = root / record["path"]
        except (OSError, ValueError, KeyError, TypeError):
            pending.unlink(missing_ok=True)
            continue
        if not os.path.lexists(src) and os.path.lexists(dest):
            os.replace(pending, dest.with_name(dest.name + ".json"))
        else:
            pending.unlink(missing_ok=True)


def _signature(path: Path) -> tuple | None:
    """(count, total size, newest mtime in ns) of a file or a whole folder; None if gone."""
    try:
        st = path.lstat()
    except OSError:
        return None
    if not path.is_dir() or path.is_symlink():
        return (1, st.st_size, st.st_mtime_ns)
    count, size, newest = 0, 0, st.st_mtime_ns
    for dirpath, dirnames, filenames in os.walk(path):
        for entry in (*dirnames, *filenames):
            try:
                est = os.lstat(os.path.join(dirpath, entry))
            except OSError:
                continue
            count += 1
            size += est.st_size
            newest = max(newest, est.st_mtime_ns)
    return (count, size, newest)
