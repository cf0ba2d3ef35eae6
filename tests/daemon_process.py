"""Helpers for tests that run `aemon run` as a real subprocess logging JSON to a file."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

#: Result folders that hold records.
VERDICT_DIRS = ("ok", "anomaly", "rejected")


def wait_until_ready(proc: subprocess.Popen, log: Path, offset: int = 0, timeout: float = 120) -> int:
    """Wait for the daemon's ``daemon.ready`` event (in ``log`` after byte ``offset``); return its HTTP port.

    Fails at once if the process exits first, and after ``timeout`` seconds otherwise.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-5000:]
        for line in log.read_bytes()[offset:].decode(errors="replace").splitlines():
            if '"daemon.ready"' in line:
                return int(json.loads(line)["metrics_port"])
        time.sleep(0.1)
    raise AssertionError("daemon never became ready:\n" + log.read_text(errors="replace")[-5000:])


def png_bytes(pixels: np.ndarray) -> bytes:
    """``pixels`` as PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, kind, data and CRC (for PNGs written by hand)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write ``pixels`` as a PNG at ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(pixels))
    return path


class Daemon:
    """One `aemon run` subprocess on ``root``, logging JSON to ``log``.

    Args:
        root: AEMON_ROOT.
        log: File the daemon's stdout and stderr are appended to.
        settle: AEMON_SETTLE_SECONDS.
        env: Extra environment variables (a value None removes one).
        preexec: Run in the child before exec (e.g. to lower a resource limit).
        wrap: A command the daemon runs under (e.g. ``unshare`` to give it a namespace of its own).
    """

    def __init__(self, root: Path, log: Path, settle: float = 0.3, env: dict[str, str | None] | None = None,
                 preexec: Callable[[], None] | None = None, wrap: tuple[str, ...] = ()) -> None:
        self.root, self.log = root, log
        # One process unless a test asks for workers: each costs a TensorFlow start-up.
        full = {**os.environ, "AEMON_ROOT": str(root), "AEMON_METRICS_PORT": "0", "AEMON_WORKERS": "1",
                "AEMON_SETTLE_SECONDS": str(settle), "AEMON_LOG_FORMAT": "json", "AEMON_RESCAN_SECONDS": "1"}
        full.pop("AEMON_MODEL", None)
        full.pop("NOTIFY_SOCKET", None)
        for name, value in (env or {}).items():  # None removes a variable
            if value is None:
                full.pop(name, None)
            else:
                full[name] = value
        self.offset = log.stat().st_size if log.exists() else 0  # this run's lines start here
        with log.open("ab") as out:
            self.proc = subprocess.Popen([*wrap, sys.executable, "-m", "aemon", "run"], env=full, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=preexec)
        self.port = None
        STARTED.append(self)

    def wait_ready(self, timeout: float = 120) -> Daemon:
        self.port = wait_until_ready(self.proc, self.log, self.offset, timeout)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def events(self, name: str) -> list[dict]:
        """This run's log events called ``name``."""
        out = []
        for line in self.log.read_bytes()[self.offset:].decode(errors="replace").splitlines():
            if f'"{name}"' in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, ""

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode


def inotify_watches(pid: int | str = "self", descendants: bool = False) -> int:
    """inotify watches held by process ``pid`` (every instance), and by its descendants if asked, from
    /proc/PID/fdinfo."""
    count = 0
    if descendants:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                    count += inotify_watches(int(child), descendants=True)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                count += Path(f"/proc/{pid}/fdinfo/{fd}").read_text().count("inotify wd:")
    return count


def half_written(path: Path, data: bytes):
    """``path`` opened for writing with the first half of ``data`` written and flushed: a writer paused
    mid-file, held open by the caller (finished by :func:`finish_and_stop`)."""
    fp = open(path, "wb")  # noqa: SIM115 - held open by the caller
    fp.write(data[: len(data) // 2])
    fp.flush()
    return fp


def finish_and_stop(daemon: Daemon, held: list, rest: bytes, n: int) -> dict[str, list[dict]]:
    """After five settle times, write ``rest`` to each file ``held`` open and close it; wait for ``n`` records,
    stop the daemon (exit 0 asserted) and return the records by item."""
    time.sleep(1.5)
    for fp in held:
        fp.write(rest)
        fp.close()
    wait_records(daemon.root, n, daemon)
    time.sleep(0.5)
    found = by_item(daemon.root)
    assert daemon.stop() == 0, daemon.text()
    return found


#: Every daemon started, in order: a test's own are stopped after it, even when it failed midway.
STARTED: list[Daemon] = []


def stop_started_since(count: int) -> None:
    """Stop the daemons started after the first ``count`` that still run (SIGTERM, then SIGKILL)."""
    for daemon in STARTED[count:]:
        if daemon.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.stop()


def _is_record(dirpath: str, name: str) -> bool:
    """``NAME.json`` beside ``NAME`` is a record; any other file is an item (names are reserved with
    their record, so an item never lies beside an item of its name without ``.json``)."""
    return name.endswith(".json") and os.path.lexists(os.path.join(dirpath, name[: -len(".json")]))


def _maps_named(dirpath: str, files: list[str]) -> set[str]:
    """The anomaly maps that the records in ``dirpath`` name (each record's ``map``, and its rows'): a map
    file no record names counts as an item, a stray."""
    named = set()
    for name in files:
        if not _is_record(dirpath, name):
            continue
        try:
            record = json.loads(Path(dirpath, name).read_bytes())
        except (OSError, ValueError):
            continue
        named |= {record.get("map")} | {row.get("map") for row in record.get("rows") or []}
    return named - {None}


def records(root: Path) -> list[Path]:
    """Every committed record under ok/, anomaly/ and rejected/ (links are never followed)."""
    out = []
    for d in VERDICT_DIRS:
        for dirpath, _, files in os.walk(root / d):
            out += [Path(dirpath, f) for f in files if _is_record(dirpath, f)]
    return sorted(out)


def items(root: Path) -> list[Path]:
    """Every routed item (not a record, not a map) under ok/, anomaly/ and rejected/, links included, never
    followed."""
    out = []
    for d in VERDICT_DIRS:
        for dirpath, dirs, files in os.walk(root / d):
            maps = _maps_named(dirpath, files)
            out += [Path(dirpath, f) for f in files if not _is_record(dirpath, f) and f not in maps]
            out += [Path(dirpath, f) for f in dirs if os.path.islink(os.path.join(dirpath, f))]
    return sorted(out)


def wait_records(root: Path, n: int, daemon: Daemon | None = None, timeout: float = 60) -> list[Path]:
    """Wait until at least ``n`` records exist; return them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = records(root)
        if len(found) >= n:
            return found
        if daemon is not None:
            assert daemon.proc.poll() is None, daemon.text()
        time.sleep(0.1)
    raise AssertionError(f"{len(records(root))} records, expected {n}:\n" + (daemon.text() if daemon else ""))


def claimed(root: Path) -> int:
    """Entries lying in the batch folders of any daemon on ``root`` (its own files excluded)."""
    n = 0
    for owner in (root / ".aemon" / "claims").iterdir():
        try:
            n += sum(1 for e in os.listdir(owner) if not e.startswith("."))
        except (NotADirectoryError, FileNotFoundError):
            continue
    return n


def wait_drained(root: Path, daemon: Daemon, timeout: float = 600, quiet: float = 2.0) -> None:
    """Wait until the inbox and every batch folder have been empty for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        assert daemon.proc.poll() is None, daemon.text()
        if os.listdir(root / "inbox") or claimed(root):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > quiet:
            return
        time.sleep(0.2)
    raise AssertionError("the inbox never drained:\n" + daemon.text())


def load(record: Path) -> dict:
    return json.loads(record.read_text())


def by_item(root: Path) -> dict[str, list[dict]]:
    """Records by their ``item`` field."""
    out: dict[str, list[dict]] = {}
    for rec in records(root):
        data = load(rec)
        out.setdefault(data["item"], []).append(data)
    return out


def new_root(tmp_path: Path, name: str = "root") -> Path:
    root = tmp_path / name
    (root / "inbox").mkdir(parents=True)
    return root


def full_tmpfs(path: Path, prepare: Callable[[Path], object] = lambda path: None) -> bool:
    """Mount a 4 MiB tmpfs at ``path``, let ``prepare`` make what a test needs on it, then fill it to the
    last byte (a real ENOSPC). False where mounting is not allowed (needs root); unmount with ``umount -l``."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        return False
    prepare(path)
    full_tmpfs_fill(path)
    return True


def full_tmpfs_fill(path: Path) -> None:
    """Fill the filesystem at ``path`` to its last byte with the file ``path/filler``."""
    with open(path / "filler", "wb", buffering=0) as out:  # unbuffered: nothing is left to fail at close
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError:
            pass
