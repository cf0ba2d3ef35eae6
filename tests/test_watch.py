"""aemon.watch against real inotify: recursive watches, renames in and out, writes and closes."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from daemon_process import inotify_watches

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


def test_two_folders_that_had_one_name_leave_the_watch_working_and_stoppable(tmp_path: Path) -> None:
    """A folder moved out of the watched tree keeps its watch (a folder rejected whole lies in rejected/), and a
    new folder under the same name gets another for the same path. When the second went and then the first was
    deleted, watchdog's book-keeping met the path twice: a KeyError killed the reader thread (no event after
    it: the daemon was left to its rescans) and stop() raised it too (the daemon's SIGTERM ended in a
    traceback, exit 1). Found by a helper's attack on the daemon."""
    for name in ("w", "kept", "gone"):
        (tmp_path / name).mkdir()
    seen, on_event = _collect(tmp_path)
    watch = TreeWatch(tmp_path / "w", on_event, lambda: None)
    watch.start()
    try:
        for target in ("kept", "gone"):
            (tmp_path / "w" / "ee").mkdir()
            assert not _wait_for(seen, {("create", "ee")})
            seen.clear()
            (tmp_path / "w" / "ee").rename(tmp_path / target / "ee")
            time.sleep(0.2)
        (tmp_path / "gone" / "ee").rmdir()
        time.sleep(0.2)
        (tmp_path / "kept" / "ee").rmdir()  # an operator clears rejected/
        time.sleep(0.2)
        (tmp_path / "w" / "later.png").write_bytes(b"x")
        assert not _wait_for(seen, {("close_write", "later.png")}), seen
    finally:
        watch.stop()  # raised KeyError
        watch.join(5)


def _wait_watches(expected: int, poke: Path | None = None, timeout: float = 10.0) -> int:
    """Poll the watch count until it is ``expected`` (writing ``poke`` now and then: watches of folders
    renamed away go at a later event); return the last count."""
    deadline = time.monotonic() + timeout
    while (count := inotify_watches()) != expected and time.monotonic() < deadline:
        if poke is not None:
            poke.write_bytes(b"x")
        time.sleep(0.1)
    return count


@contextlib.contextmanager
def _watching(tmp_path: Path) -> Iterator[list[tuple[str, str]]]:
    """A :class:`TreeWatch` on ``tmp_path/w`` (made if missing, with ``tmp_path/out`` beside it to move folders
    to) for the ``with`` block: yields the events it passes on, ``(kind, path below w)``. At the block's end, the
    watch's sorted index of its watches (which finds a folder's subtree) must still mirror watchdog's map."""
    (tmp_path / "w").mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    seen, on_event = _collect(tmp_path)
    watch = TreeWatch(tmp_path / "w", on_event, lambda: None)
    watch.start()
    try:
        yield seen
        group = watch._group
        with group._lock:
            assert group._sorted == sorted((path, wd) for wd, path in group._active_callbacks_by_watch.items())
    finally:
        watch.stop()
        watch.join(5)


def test_folders_renamed_away_lose_their_watches_and_renamed_within_keep_working(tmp_path: Path) -> None:
    """A watch follows its folder's inode: a folder claimed into .aemon/, rejected whole or moved out by a person
    kept its watches (and reported its later events under its old inbox path), so folders kept in rejected/
    used up fs.inotify.max_user_watches over a daemon's life. A folder renamed within the tree keeps its
    watches throughout (a first version dropped them until the rename's second half: a helper's attack)."""
    before = inotify_watches()
    with _watching(tmp_path) as seen:
        assert inotify_watches() == before + 1
        for i in range(5):
            (tmp_path / "w" / f"f{i}" / "sub").mkdir(parents=True)
        (tmp_path / "w" / "f1x").mkdir()  # a name sharing f1's beginning: it keeps its watch
        assert not _wait_for(seen, {("create", f"f{i}") for i in range(5)} | {("create", "f1x")})
        assert _wait_watches(before + 12) == before + 12
        for i in range(4):
            (tmp_path / "w" / f"f{i}").rename(tmp_path / "out" / f"f{i}")
        (tmp_path / "w" / "f4").rename(tmp_path / "w" / "renamed")
        with open(tmp_path / "w" / "renamed" / "sub" / "new.png", "wb") as f:  # at once: no gap in its events
            f.write(b"x")
        assert not _wait_for(seen, {("close_write", "renamed/sub/new.png")}), seen
        # The root, f1x, and the folder renamed within the tree with its subfolder.
        assert _wait_watches(before + 4, poke=tmp_path / "w" / "poke") == before + 4
        seen.clear()
        (tmp_path / "out" / "f0" / "sub" / "late.png").write_bytes(b"x")
        (tmp_path / "w" / "renamed" / "sub" / "later.png").write_bytes(b"x")
        (tmp_path / "w" / "f1x" / "kept.png").write_bytes(b"x")
        assert not _wait_for(seen, {("close_write", "renamed/sub/later.png"), ("close_write", "f1x/kept.png")}), seen
        time.sleep(0.2)
        assert not [path for _, path in seen if path.startswith("f0")], seen
    assert inotify_watches() == before


def test_events_of_a_folder_renamed_away_never_speak_for_a_new_folder_of_its_name(tmp_path: Path) -> None:
    """A folder renamed away keeps its watches a second, still under its old path, which a new folder may
    take at once (a folder claimed, and another dropped under its name). Its events then spoke for the new
    one: the close of a file in the old copy hid an open file of the new (taken half written), and a
    subfolder renamed in the old copy marked the new folder's own subfolder as gone, whose watch was then
    removed for good: its files made no events (a helper's attack, in 5 of 5 and 10 of 10 tries)."""
    (tmp_path / "w" / "c" / "s").mkdir(parents=True)
    with _watching(tmp_path) as seen:
        old = open(tmp_path / "w" / "c" / "f.png", "wb")  # noqa: SIM115 - closed below, after the move
        old.write(b"x")
        old.flush()
        assert not _wait_for(seen, {("modify", "c/f.png")})
        (tmp_path / "w" / "c").rename(tmp_path / "out" / "c")
        (tmp_path / "w" / "c" / "s").mkdir(parents=True)
        assert not _wait_for(seen, {("create", "c"), ("create", "c/s")})
        seen.clear()
        old.close()  # the old copy's file, outside the tree now
        (tmp_path / "out" / "c" / "s").rename(tmp_path / "out" / "c" / "t")  # the old copy's subfolder
        time.sleep(0.3)
        assert not [e for e in seen if e[1].startswith("c")], seen
        time.sleep(1.0)  # past the second a folder renamed away keeps its watches
        (tmp_path / "w" / "poke").write_bytes(b"x")
        time.sleep(0.3)
        (tmp_path / "w" / "c" / "s" / "new.png").write_bytes(b"x")
        assert not _wait_for(seen, {("close_write", "c/s/new.png")}), seen


def test_a_name_made_and_removed_at_once_never_keeps_a_folder_renamed_away(tmp_path: Path) -> None:
    """A folder made and removed at once under the name of one just renamed away: by the time the reader
    added its watch it was gone, and the look-up of the path met watchdog's stale entry, the old folder's
    watch, which was then kept for good: its events spoke for the next folder of that name (a close hid a
    file the new one had open) and it leaked (a helper's attack: 10 of 10 tries)."""
    before = inotify_watches()
    with _watching(tmp_path) as seen:
        for i in range(5):
            (tmp_path / "w" / f"c{i}").mkdir()
        assert not _wait_for(seen, {("create", f"c{i}") for i in range(5)})
        assert _wait_watches(before + 6) == before + 6
        old = [open(tmp_path / "w" / f"c{i}" / "f.png", "wb") for i in range(5)]  # noqa: SIM115 - closed below
        assert not _wait_for(seen, {("create", f"c{i}/f.png") for i in range(5)})
        for i in range(5):
            (tmp_path / "w" / f"c{i}").rename(tmp_path / "out" / f"c{i}")
            (tmp_path / "w" / f"c{i}").mkdir()
            (tmp_path / "w" / f"c{i}").rmdir()
        time.sleep(0.3)
        seen.clear()
        for fp in old:
            fp.close()  # in the old copies, outside the tree
        time.sleep(1.2)  # past the second a folder renamed away keeps its watches
        assert _wait_watches(before + 1, poke=tmp_path / "w" / "poke") == before + 1
        assert not [e for e in seen if e[1].startswith("c")], seen
