"""Worker processes: more daemons on the same root, so that one ``aemon run`` keeps every core busy.

One Python process scores, decodes and commits on one core at a time (the GIL). ``AEMON_WORKERS``
(default: the cores this process may use) starts ``N - 1`` extra ``aemon run --worker`` processes
beside the main one. Each is a whole daemon without HTTP: it watches the inbox, claims entries
into its own claims folder and commits them; the claims make sharing a root safe, exactly as
for replicas. The main process serves ``/metrics`` for all of them (prometheus_client's
multiprocess mode, files under ``.aemon/metrics/``), forwards SIGHUP, restarts a worker that
exits, and stops them on shutdown. A worker stops with its parent (``PR_SET_PDEATHSIG``), and its
unfinished batches are adopted like those of any stopped daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from aemon.claims import owner_alive, owner_name
from aemon.errors import StartupError
from aemon.fsio import Folders, write_durably
from aemon.logs import get_logger
from aemon.settings import Settings

__all__ = ["metrics_dir", "shared_dir", "remove_shared", "die_with_parent", "send_beat", "WorkerPool", "announce",
           "announced", "ModelAgreement"]

log = get_logger()

#: Seconds before a worker that exited within :data:`STABLE_SECONDS` of its start is started again; doubled
#: each time it does so again (a worker that cannot start), up to :data:`MAX_BACKOFF`. A worker that ran
#: longer is started again at once.
RESTART_BACKOFF = 5.0
MAX_BACKOFF = 300.0
STABLE_SECONDS = 60.0
#: Seconds a starting worker may take before its loop first beats (TensorFlow and the bundle load).
STARTUP_SECONDS = 180.0
#: The model version the main process serves (in the daemon's own folder, :func:`metrics_dir`), for its
#: workers to match. One per daemon: daemons sharing a root may serve different bundles (a rolling update).
SERVED_MODEL = "served-model.json"
#: A worker asks the main process to reload at most this often (seconds).
NUDGE_INTERVAL = 5.0
_PR_SET_PDEATHSIG = 1


def metrics_dir(root: Path) -> Path:
    """A fresh folder for this daemon's multiprocess metrics, under ``root/.aemon/metrics``.

    Folders of daemons that no longer run on this host are removed (their counters are over).
    """
    state = Path(root) / ".aemon"
    for folder in (state, state / "metrics"):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise StartupError(f"{folder} is a link or a file; aemon never follows links out of its root: "
                               "make it a real folder")
    base = state / "metrics"
    if base.is_dir():
        for old in base.iterdir():
            if owner_alive(old.name) is False:
                shutil.rmtree(old, ignore_errors=True)
    path = base / owner_name()
    path.mkdir(parents=True)
    return path


def _reached(folder: Path) -> tuple[Folders, str]:
    """``folder`` (``ROOT/.aemon/metrics/NAME``) opened one name at a time from its root, never through a link,
    and its path relative to the root.

    Raises:
        NotADirectoryError: it, or a folder above it up to the root, was replaced by a link or a file while the
            daemon ran (the daemon stops; its next start says so).
    """
    root = folder.parents[2]
    folders = Folders(root)
    rel = folders.relative(folder)
    try:
        folders.fd(rel)
    except BaseException:
        folders.close()
        raise
    return folders, rel


def check_shared(folder: Path) -> None:
    """Before anything is written in the shared ``folder`` by path (a worker's metrics files): it is still a
    real folder under the root.

    Raises:
        NotADirectoryError: see :func:`_reached`.
    """
    folders, _ = _reached(folder)
    folders.close()


def remove_shared(folder: Path) -> None:
    """Remove this daemon's shared ``folder`` at exit; one replaced by a link (or a link above it) is left
    alone: nothing outside the root is removed."""
    try:
        folders, rel = _reached(folder)
    except OSError:
        return
    with folders:
        parent, _, name = rel.rpartition("/")
        shutil.rmtree(name, ignore_errors=True, dir_fd=folders.fd(parent))


def die_with_parent(parent: int) -> None:
    """In a worker: get SIGTERM when the main process dies (Linux; elsewhere nothing); stop now if it has."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        raise SystemExit(0)


def send_beat(fd: int) -> None:
    """In a worker: tell the main process that the loop made progress (one byte down the heartbeat pipe)."""
    with contextlib.suppress(BlockingIOError, BrokenPipeError):  # pipe full (parent busy) or parent gone
        os.write(fd, b".")


def _worker_env(settings: Settings) -> dict[str, str]:
    """The main process's effective settings as ``AEMON_*`` variables, so each worker runs exactly them."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AEMON_")}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"AEMON_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env["AEMON_WORKERS"] = "1"
    env.pop("NOTIFY_SOCKET", None)  # only the main process talks to systemd
    return env


def restart_delay(previous: float, lived: float) -> float:
    """Seconds to wait before starting again a worker that exited after ``lived`` seconds, ``previous`` being
    its last delay: 0 after a stable run, else :data:`RESTART_BACKOFF` doubled each time, up to
    :data:`MAX_BACKOFF`."""
    if lived >= STABLE_SECONDS:
        return 0.0
    return min(max(previous * 2, RESTART_BACKOFF), MAX_BACKOFF)


class WorkerPool:
    """``count`` worker processes of one main daemon.

    A worker's loop beats down a pipe (:func:`send_beat`); one that stays silent for ``stale`` seconds
    (stopped, deadlocked, stuck in I/O) holds its claimed entries from every other process, so it is killed
    and started again, and its entries are adopted.

    Args:
        settings: The main process's settings (passed on through the environment).
        count: How many workers to run.
        stale: Seconds of silence after which a running worker is killed (the main process's own liveness
            limit).
    """

    def __init__(self, settings: Settings, count: int, stale: float = 30.0) -> None:
        self.settings = settings
        self.count = count
        self.stale = stale
        self._beats: dict[int, int] = {}  # read end of each worker's heartbeat pipe
        self._last_beat: dict[int, float] = {}  # its start until its loop first beats
        self._killed: set[int] = set()  # workers killed for silence, not yet gone
        self._procs: dict[int, subprocess.Popen] = {}
        self._started: dict[int, float] = {}
        self._exited: dict[int, float] = {}  # when a worker that is not running again yet was seen gone
        self._backoff: dict[int, float] = {}
        self._stopping = False

    def start(self) -> None:
        """Start every worker."""
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        # The worker starts with SIGHUP held (the mask is inherited): a reload passed on while it is still
        # starting waits for its handler instead of ending it.
        shared = shared_dir()
        if shared is not None:  # the worker writes its metrics files there by path
            check_shared(shared)
        beats, beat_end = os.pipe()
        os.set_blocking(beats, False)
        os.set_blocking(beat_end, False)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            proc = subprocess.Popen([sys.executable, "-m", "aemon", "run", "--worker",
                                     f"{index}:{self.count + 1}:{os.getpid()}:{beat_end}"],
                                    env=_worker_env(self.settings), pass_fds=(beat_end,))
        except BaseException:
            os.close(beats)
            raise
        finally:
            os.close(beat_end)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        self._close_beats(index)
        self._procs[index] = proc
        self._beats[index] = beats
        self._started[index] = self._last_beat[index] = time.monotonic()
        self._killed.discard(index)
        log.info("worker.started", worker=index, pid=proc.pid)

    def _close_beats(self, index: int) -> None:
        fd = self._beats.pop(index, None)
        if fd is not None:
            os.close(fd)

    def _silent_for(self, index: int, now: float) -> float:
        """Seconds since worker ``index`` last beat (its pipe read empty), or 0 within its allowance."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._beats[index], 4096):
                self._last_beat[index] = now
        beaten = self._last_beat[index] > self._started[index]
        silent = now - self._last_beat[index]
        return silent if silent > (self.stale if beaten else STARTUP_SECONDS) else 0.0

    def check(self) -> None:
        """Kill a worker that stopped beating; start again one that exited, after its backoff (see
        :data:`RESTART_BACKOFF`)."""
        if self._stopping:
            return
        now = time.monotonic()
        for index, proc in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                silent = self._silent_for(index, now)
                if silent and index not in self._killed:  # killed once: it may take a while to go (I/O)
                    self._killed.add(index)
                    log.error("worker.stuck", worker=index, pid=proc.pid, silent_s=round(silent, 1),
                              hint="its loop made no progress (stopped, deadlocked or stuck in I/O): killed, "
                                   "started again, and its entries adopted")
                    proc.kill()
                continue
            if index not in self._exited:
                self._exited[index] = now
                lived = now - self._started[index]
                self._backoff[index] = restart_delay(self._backoff.get(index, 0.0), lived)
                _mark_dead(proc.pid)  # before the event: once it is logged, the files are gone
                log.error("worker.exited", worker=index, pid=proc.pid, code=code, lived_s=round(lived, 1),
                          restart_in_s=self._backoff[index])
            if now - self._exited[index] >= self._backoff[index]:
                del self._exited[index]
                self._spawn(index)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every live worker (SIGHUP: reload the bundle)."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def stop(self, grace: float) -> None:
        """SIGTERM every worker and wait for them (killed after ``grace`` + 10 s)."""
        self._stopping = True
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 10.0
        for index, proc in self._procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker.killed", worker=index, pid=proc.pid)
                proc.kill()
                proc.wait()
            _mark_dead(proc.pid)
            self._close_beats(index)
        self._procs.clear()


def shared_dir() -> Path | None:
    """The folder this daemon's processes share (its :func:`metrics_dir`), None with no worker processes."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(folder) if folder else None


def announce(folder: Path, identity: str, path: Path) -> None:
    """Main process: store the bundle it serves (its :attr:`~aemon.bundle.Bundle.identity`, after each load)
    and the folder it loaded it from in its daemon's shared ``folder``, before its workers load theirs.
    Written through the open folders, never through a link.

    Raises:
        NotADirectoryError: see :func:`_reached`.
    """
    folders, rel = _reached(folder)
    with folders:
        served = {"identity": identity, "path": os.fspath(os.path.abspath(path))}
        write_durably(folder / SERVED_MODEL, (json.dumps(served) + "\n").encode(), folders=folders)
        folders.sync(rel)


def _served(folder: Path) -> dict:
    """What :func:`announce` stored (empty where the main process has not said, or the file is unreadable)."""
    try:
        served = json.loads((folder / SERVED_MODEL).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return served if isinstance(served, dict) else {}


def announced(folder: Path) -> str | None:
    """The identity of the bundle the main process serves, or None where it has not said."""
    identity = _served(folder).get("identity")
    return None if identity is None else str(identity)


def announced_path(folder: Path) -> Path | None:
    """The bundle folder the main process loaded last, or None where it has not said."""
    path = _served(folder).get("path")
    return Path(path) if isinstance(path, str) else None


class ModelAgreement:
    """A worker's side of "one model across the daemon".

    Each process loads the bundle from its path; if the bundle folder changes between the main process's
    load and a worker's (a bundle swapped during a reload, or a worker restarted after a swap without
    SIGHUP), they would score with different models. Bundles are compared whole (their identity: two
    calibrations of one model can share a version). A worker that loaded another bundle than the main
    process serves keeps the main one where it still has it, and asks the main process to reload (SIGHUP
    to its parent, at most every :data:`NUDGE_INTERVAL` seconds); the main process then reloads and passes
    the reload on, so every process ends on the bundle the folder now holds. A worker whose own reload
    failed while the main process's succeeded loads again until it serves the main bundle (:meth:`behind`).
    """

    def __init__(self, folder: Path, worker: int) -> None:
        self.folder, self.worker = folder, worker
        self._nudged = self._retried = float("-inf")

    def path(self) -> Path | None:
        """Where the main process loaded the bundle it serves (a reload may have taken a new path)."""
        return announced_path(self.folder)

    def behind(self, serving) -> bool:
        """Whether this worker, serving ``serving``, should load the bundle again: it serves another version
        than the main process (its own reload failed where the main one's succeeded, e.g. the folder was
        moved away between them); at most every :data:`NUDGE_INTERVAL` seconds."""
        main = announced(self.folder)
        now = time.monotonic()
        if main is None or serving.identity == main or now - self._retried < NUDGE_INTERVAL:
            return False
        self._retried = now
        log.warning("bundle.behind", worker=self.worker, serving=serving.identity, main=main,
                    hint="this worker serves another model than the main process: it loads the bundle again")
        return True

    def choose(self, loaded, current=None):
        """The bundle this worker serves after loading ``loaded`` while serving ``current`` (None at start)."""
        main = announced(self.folder)
        if main is None or loaded.identity == main:
            return loaded
        keep = current is not None and current.identity == main
        log.warning("bundle.diverged", worker=self.worker, loaded=loaded.identity, main=main,
                    serving=(current if keep else loaded).identity,
                    hint="the bundle folder changed between the processes' loads: the main process reloads")
        now = time.monotonic()
        if now - self._nudged >= NUDGE_INTERVAL:
            self._nudged = now
            os.kill(os.getppid(), signal.SIGHUP)
        return current if keep else loaded


def _mark_dead(pid: int) -> None:
    """Drop a dead worker's live gauges from the multiprocess metrics, and all its value files if it counted
    nothing (a worker that failed to start): each start reserves about 320 KiB of them."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    # Imported here: prometheus_client must not load before the main process has set the folder.
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict

    from aemon.metrics import VALUE_FILES

    multiprocess.mark_process_dead(pid)
    files = [Path(folder, f"{kind}_{pid}.db") for kind in VALUE_FILES]
    try:
        for path in files:
            if path.name.startswith(("counter_", "histogram_")) and path.exists() and any(
                    value for _, value, _, _ in MmapedDict.read_all_values_from_file(os.fspath(path))):
                return  # it counted something: the totals keep it
    except Exception:  # best effort: a file it cannot read is kept, as before
        return
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
