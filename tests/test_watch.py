"""aemon.watch against real inotify: recursive watches, renames in and out, writes and closes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from aemon.watch import TreeWatch


def _collect(tmp_path: Path):
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def on_event(event, path: bytes) -> None:
        kinds = [k for k in ("is_moved_to", "is_moved_from", "is_close_write", "is_modify", "is_create")
                 if getattr(event, k)]
        with lock:
            seen.extend((kind[3:], os.path.relpath(os.fsdecode(path), tmp_path / "w")) for kind in kinds)

    return seen, on_event


def _wait_for(seen: list, wanted: set, timeout: float = 5.0) -> set:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not wanted <= set(seen):
        time.sleep(0.02)
    return wanted - set(seen)


def test_events_below_new_folders_renames_and_closes(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "outside").write_bytes(b"x")
    seen, on_event = _collect(tmp_path)
    watch = TreeWatch(tmp_path / "w", on_event, lambda: None)
    watch.start()
    try:
        (tmp_path / "w" / "a" / "b").mkdir(parents=True)
        _wait_for(seen, {("create", "a")})
        time.sleep(0.2)  # the new folders' watches are added by the reader thread
        with open(tmp_path / "w" / "a" / "b" / "deep.png", "wb") as f:
            f.write(b"data")
        os.rename(tmp_path / "outside", tmp_path / "w" / "moved-in.png")
        os.rename(tmp_path / "w" / "moved-in.png", tmp_path / "gone.png")
        missing = _wait_for(seen, {("create", "a/b/deep.png"), ("modify", "a/b/deep.png"),
                                   ("close_write", "a/b/deep.png"), ("moved_to", "moved-in.png"),
                                   ("moved_from", "moved-in.png")})
        assert not missing, (missing, seen)
    finally:
        watch.stop()
        watch.join(5)
    assert not [t for t in threading.enumerate() if t.name == "aemon-inotify"]
    count = len(seen)
    (tmp_path / "w" / "after.png").write_bytes(b"x")
    time.sleep(0.2)
    assert len(seen) == count, "events after stop"
