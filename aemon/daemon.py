"""The daemon's lifecycle: startup → main loop → shutdown (after uvicorn ``server.py``).

The loop thread takes complete inbox entries, claims them into one batch folder, decodes
them, scores the batch with one model call and commits it (:mod:`aemon.commit`), all on one
thread; worker processes (:mod:`aemon.workers`) use the other cores. Watchdog's inotify reader (or
its polling observer) and the HTTP server run on their own threads; signal handlers only set flags.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from aemon.bundle import Bundle, default_bundle_path, find_bundle, load_bundle
from aemon.claims import Claim, ClaimStore
from aemon.commit import Batch, Committer
from aemon.confine import LIBRARY_FOLDERS, confine_libraries
from aemon.errors import AemonError, BundleError, ItemRejected, StartupError
from aemon.fsio import has_room, mount_points
from aemon.http import HttpServer, is_loopback
from aemon.inbox import Inbox
from aemon.logs import get_logger
from aemon.metrics import build, reserve_value_files
from aemon.pipeline import decide, decode
from aemon.recorder import Recorder
from aemon.router import FOLDERS, Router
from aemon.settings import Settings
from aemon.units import Unit, expand
from aemon.workers import ModelAgreement, WorkerPool, announce, send_beat, shared_dir

__all__ = ["Daemon"]


def freeze_heap(collect: bool = False) -> None:
    """Take what is alive now (TensorFlow, Keras, the bundle: about 380,000 objects) out of the cyclic
    garbage collector's sight; with ``collect``, after a collection over everything (a reload: it frees
    the old bundle; 150 ms, so not at startup, where there is almost nothing to free).

    A full collection walked all of them: 150-270 ms with the loop stopped, and in two processes with equal
    loads at about the same moment (once in a 15,000-item run of ``benchmarks/daemon.py``).
    """
    if collect:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


class _OutOfGrace(Exception):
    """A stop was asked for longer than the shutdown grace ago, while a batch was still being decided."""

#: Seconds between loop ticks (flag checks, heartbeat, watchdog ping).
TICK = 0.1
#: ``/healthz`` fails once the loop has made no progress for this long (systemd's ``WATCHDOG_USEC`` when
#: set): a tick, or a step of a large batch.
HEARTBEAT_STALE = 30.0
#: Filesystem errors that stop the daemon in order and say nothing of the items in hand (a full or read-only
#: root, the system's file table full): the tries of the batches it leaves claimed are not counted as deaths
#: (an error an item can cause, such as this process's open-files limit or a read error, still counts, and
#: the item ends rejected as ``crashed``).
NOT_A_DEATH = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENFILE})
#: Recursion limit while running: enough to walk any path PATH_MAX allows (about 2,000 folder levels).
WALK_RECURSION = 10_000

log = get_logger()


class Daemon:
    """Watches ``settings.root/inbox`` and routes every item it finds.

    Args:
        settings: The daemon's settings.
        registry: Prometheus registry that ``/metrics`` serves (a fresh one by default).
        bundle: An already loaded bundle (tests); by default loaded at startup.
        workers: Worker processes to run beside this one (see :mod:`aemon.workers`).
        worker: This process is worker number ``worker``: no HTTP, no systemd notify; it only routes items.
        of: With ``worker``: how many processes share the inbox (the main one included).
        beat_fd: With ``worker``: the pipe its loop beats down to the main process.
    """

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None,
                 bundle: Bundle | None = None, workers: int = 0, worker: int | None = None, of: int = 0,
                 beat_fd: int | None = None, reread: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        #: Reads the settings again as at start (the config file and flags): a SIGHUP takes a new model path.
        self._reread = reread
        self.root = Path(os.path.abspath(settings.root))
        self.registry = registry or CollectorRegistry()
        self.worker = worker
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Worker processes: values go to files that the main process's collector sums.
            from prometheus_client import multiprocess

            folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
            try:
                reserve_value_files(folder)
            except OSError as exc:
                raise StartupError.of(f"no room for the metrics files in {folder}: {exc}", exc) from exc
            self.metrics = build(CollectorRegistry(), info_registry=self.registry)
            if worker is None:
                multiprocess.MultiProcessCollector(self.registry)
        else:
            self.metrics = build(self.registry)
        self.stale = _watchdog_seconds() or HEARTBEAT_STALE
        self._beat_fd = beat_fd
        self.pool = WorkerPool(settings, workers, self.stale) if workers > 0 and worker is None else None
        self.shared = shared_dir()
        self.agreement = ModelAgreement(self.shared, worker) if worker is not None and self.shared else None
        self.bundle = bundle
        # A bundle folder, else a shipped bundle by name (AEMON_MODEL=mnist-denoise), as the verbs take one.
        self.bundle_path = (find_bundle(settings.model) or Path(settings.model)) if settings.model else None
        self.router = Router(self.root)
        self.inbox = Inbox(self.root, settings.settle_seconds, settings.rescan_seconds, settings.polling,
                           share=(worker or 0, of or 1 + workers))
        self.claims = ClaimStore(self.root)
        self.recorder = Recorder(self.metrics)
        self.committer = Committer(self.router, self.root / "inbox",
                                   lambda unit, record: self.recorder.decided(unit.arrived, record), self._committed,
                                   self.beat)
        #: Entries claimed and not yet committed.
        self.in_flight = 0
        self._last_adopt = float("-inf")
        self.limits = settings.limits
        self.http: HttpServer | None = None
        self.should_exit = False
        self._stop_asked = float("inf")
        self.force_exit = False
        self.reload_requested = False
        self.heartbeat = 0.0
        self._pinged = float("-inf")
        self.ready = False
        self._old_handlers: dict[int, object] = {}
        self._notify_sock: socket.socket | None = None
        self._unconfine: Callable[[], None] | None = None

    # -- public ----------------------------------------------------------
    def run(self, until_idle: bool = False) -> int:
        """Start, loop until a signal (or, with ``until_idle``, until the inbox is empty), shut down.

        Returns:
            The exit status (0).

        Raises:
            StartupError: the root, folders, bundle or HTTP port are unusable.
        """
        try:
            try:
                self.startup()
            except OSError as exc:  # a root, its folders or files the daemon cannot use: a start-up failure
                where = f" ({exc.filename})" if exc.filename else ""
                raise StartupError.of(f"cannot start on {self.root}: {exc.strerror or exc}{where}", exc) from exc
            self.main_loop(until_idle)
            self.drain()
            self.claims.stopped_in_order()
        except OSError as exc:
            # An infrastructure failure (disk full, folder removed): exit non-zero so the
            # supervisor restarts us; unfinished entries stay claimed and are recovered.
            log.error("daemon.failed", error=str(exc))
            if exc.errno in NOT_A_DEATH:
                self.claims.stopped_in_order()
            raise AemonError(f"the daemon stopped on a filesystem error: {exc}") from exc
        finally:
            self.shutdown()
        return 0

    def healthy(self) -> bool:
        """True while the loop's heartbeat is fresh."""
        return time.monotonic() - self.heartbeat < self.stale

    def beat(self) -> None:
        """The loop made progress (a tick, or a step of a large batch): fresh heartbeat, and a systemd
        watchdog ping at most four times per watchdog interval (and once a second)."""
        now = self.heartbeat = time.monotonic()
        if now - self._pinged >= min(1.0, self.stale / 4):
            self._pinged = now
            self._notify("WATCHDOG=1")
            if self._beat_fd is not None:
                send_beat(self._beat_fd)

    def is_ready(self) -> bool:
        """True once the model is loaded and the folders are usable (the inbox writable and still the folder
        opened at start-up, the result folders real folders, the filesystem with room left)."""
        return (self.ready and self.bundle is not None and os.access(self.root / "inbox", os.W_OK)
                and self.inbox.intact() and has_room(self.root) and self._result_folders_usable())

    def _result_folders_usable(self) -> bool:
        """Whether every result folder is a real folder, or missing (made again when needed): one replaced by a
        file or a link would fail the next commit."""
        for name in FOLDERS:
            try:
                if not stat.S_ISDIR(os.lstat(self.root / name).st_mode):
                    return False
            except FileNotFoundError:
                continue
            except OSError:
                return False
        return True

    # -- startup ---------------------------------------------------------
    def startup(self) -> None:
        """Load the bundle, check folders, lock a claims folder, start HTTP and the observer.

        Claims left by stopped daemons are adopted by the first loop tick, after readiness.
        """
        self._install_signals()
        # os.walk (ours, and watchdog's on its inotify thread) recurses once per folder level in Python
        # 3.11: a folder nested 1,100 deep killed both. Paths end at PATH_MAX, about 2,000 levels.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), WALK_RECURSION))
        self._check_folders()
        self.claims.open()
        self._unconfine = confine_libraries(self.root / ".aemon", self.claims.temp)
        if self.worker is None:  # from now on, while the model loads: /healthz 200, /readyz 503
            self.heartbeat = time.monotonic()
            self._serve_http()
        if self.bundle is None:
            self._refuse_bundle_in_inbox(self.bundle_path)
            self.bundle = self._load(self._model_path(), startup=True)
        self._check_task(self.bundle, StartupError)
        if self.agreement is not None:
            self.bundle = self.agreement.choose(self.bundle)
        elif self.pool is not None and self.shared:
            announce(self.shared, self.bundle.identity, self._model_path())
        self._set_model_metrics()
        freeze_heap()
        if self.worker is not None:
            self.inbox.start()
            self.heartbeat = time.monotonic()
            self.ready = True
            self.recorder.ready(True)
            log.info("worker.ready", worker=self.worker, root=str(self.root), version=self.bundle.version)
            return
        self.inbox.start()
        self.heartbeat = time.monotonic()
        self.ready = True
        self.recorder.ready(True)
        self._notify("READY=1")
        log.info("daemon.ready", root=str(self.root), model=self.bundle.name, version=self.bundle.version,
                 mode=self.settings.mode, metrics_host=self.settings.metrics_host, metrics_port=self.http.port,
                 workers=1 + (self.pool.count if self.pool else 0))
        if self.pool is not None:  # after readiness: their start-up does not delay ours
            self.pool.start()

    def _check_folders(self) -> None:
        if not self.root.exists():
            raise StartupError(f"root folder {self.root} does not exist; create it or set AEMON_ROOT")
        if not self.root.is_dir():
            raise StartupError(f"root {self.root} is not a folder; set AEMON_ROOT to a folder")
        state = (".aemon/claims", *(f".aemon/{name}" for name in LIBRARY_FOLDERS.values()))
        try:
            for name in ("inbox", *FOLDERS, ".aemon", *state):  # .aemon's own before its folders
                path = self.root / name
                if path.is_symlink() or (path.exists() and not path.is_dir()):
                    raise StartupError(f"{path} is a link or a file; aemon never follows links out of its root: "
                                       "make it a real folder")
                path.mkdir(exist_ok=True)
            # Claims reach their folders by rename, which crosses neither filesystems nor mounts (a bind mount of
            # one volume shares its st_dev: only the mount table tells).
            device = os.stat(self.root / ".aemon").st_dev
            mounted = set(mount_points())
            other = [name for name in ("inbox", *FOLDERS, ".aemon", ".aemon/claims")
                     if os.stat(self.root / name).st_dev != device
                     or os.path.realpath(self.root / name) in mounted]
            if other:
                raise StartupError(f"{', '.join(other)} under {self.root} lie on another filesystem or mount than "
                                   "the rest: items move by rename, which cannot cross filesystems or mounts; "
                                   "mount the whole root as one volume")
            probe = self.root / ".aemon" / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StartupError.unusable_root(self.root, exc) from exc

    def _model_path(self) -> Path:
        """The folder the bundle is loaded from: the one set (at start or by a reload), else the shipped one."""
        return self.bundle_path or default_bundle_path(self.settings.mode)

    def _refuse_bundle_in_inbox(self, path: Path | None) -> None:
        """A bundle inside the inbox would be taken as an entry (and then be gone at the next reload).

        Raises:
            StartupError: the bundle at ``path`` (None: none set) lies in the inbox.
        """
        if path is None:
            return
        inbox = os.path.realpath(self.root / "inbox")
        if os.path.commonpath([inbox, os.path.realpath(path)]) == inbox:
            raise StartupError(f"the bundle {path} lies inside the inbox {self.root / 'inbox'}, where "
                               "it would be taken as an item: move it out of the inbox and set AEMON_MODEL to it")

    def _check_task(self, bundle: Bundle, error: type[AemonError]) -> None:
        """Denoise mode needs a denoising bundle, at start-up and at every reload alike."""
        if self.settings.mode == "denoise" and bundle.meta.task != "denoise":
            raise error(f"AEMON_MODE=denoise needs a bundle trained with --denoise; {bundle.name} is a "
                        f"{bundle.meta.task} bundle (the shipped one is mnist-denoise)")

    def _load(self, path: Path, startup: bool = False) -> Bundle:
        try:
            bundle = load_bundle(path)
        except AemonError as exc:
            if startup:
                raise StartupError(f"cannot load the model: {exc}") from exc
            raise
        if not startup:
            self._check_task(bundle, BundleError)
        log.info("bundle.loaded", path=str(path), name=bundle.name, version=bundle.version,
                 threshold=bundle.threshold)
        return bundle

    def _serve_http(self) -> None:
        """Start /metrics, /healthz and /readyz (503 until :meth:`is_ready`).

        Raises:
            StartupError: the host or port cannot be served.
        """
        self.http = HttpServer(self.settings.metrics_host, self.settings.metrics_port, self.registry,
                               self.healthy, self.is_ready)
        try:
            self.http.start()
        except ValueError as exc:  # waitress: a host that is no address and resolves to none
            self.http = None
            raise StartupError(f"cannot serve HTTP on AEMON_METRICS_HOST={self.settings.metrics_host!r}: it is not "
                               "an address of this machine; use 127.0.0.1, 0.0.0.0 or a local address") from exc
        except OSError as exc:
            self.http = None
            raise StartupError(f"cannot serve HTTP on {self.settings.metrics_host}:{self.settings.metrics_port}: "
                               f"{exc.strerror}; choose another AEMON_METRICS_HOST or AEMON_METRICS_PORT") from exc
        if not is_loopback(self.settings.metrics_host):
            log.warning("http.public", host=self.settings.metrics_host, port=self.http.port,
                        hint="/metrics is served to the network without authentication; bind 127.0.0.1 "
                             "or put it behind a firewall or proxy")

    def _set_model_metrics(self) -> None:
        b = self.bundle
        self.recorder.model(b.name, b.version, b.meta.arch, b.threshold)

    # -- signals and notify ----------------------------------------------
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in ((signal.SIGTERM, self._on_exit), (signal.SIGINT, self._on_exit),
                             (signal.SIGHUP, self._on_hup)):
            self._old_handlers[sig] = signal.signal(sig, handler)
        # Held since `aemon run` started (cli): one sent meanwhile is handled now, as a reload or a stop.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGTERM})

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_exit(self, signum, frame) -> None:
        if self.should_exit and signum == signal.SIGINT:
            self.force_exit = True
            raise KeyboardInterrupt
        if not self.should_exit:
            self._stop_asked = time.monotonic()
            if self.pool is not None:  # at once: their grace runs beside ours, not after it
                self.pool.signal(signal.SIGTERM)
        self.should_exit = True

    def _on_hup(self, signum, frame) -> None:
        self.reload_requested = True

    def _notify(self, message: str) -> None:
        addr = os.environ.get("NOTIFY_SOCKET") if self.worker is None else None
        if not addr:
            return
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            if self._notify_sock is None:
                self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify_sock.sendto(message.encode(), addr)
        except OSError as exc:
            log.warning("notify.failed", error=str(exc))

    # -- loop ------------------------------------------------------------
    def main_loop(self, until_idle: bool = False) -> None:
        """Take a batch and process it, or wait for the next event; until asked to stop."""
        while not self.should_exit:
            started = time.monotonic()
            self.on_tick()
            claims = self._gather()
            if claims:
                self.process(claims)
                continue
            if until_idle and self.inbox.idle():
                break
            # Wake on the next inbox event rather than at the next tick: latency, not polling.
            self.inbox.wait(max(0.0, TICK - (time.monotonic() - started)))

    def on_tick(self) -> None:
        """Heartbeat, watchdog ping, pending gauge, orphan claims, a requested reload."""
        self.beat()
        self._set_pending()
        if self.heartbeat - self._last_adopt >= self.settings.rescan_seconds:
            self._adopt_orphans()
            if self.pool is not None:
                self.pool.check()
            if self.agreement is not None and self.agreement.behind(self.bundle):
                self.reload_requested = True
        if self.reload_requested:
            self.reload()

    def reload(self) -> None:
        """Load the bundle again (SIGHUP); on failure keep the old one. The main process passes a reload
        it made on to the workers, which then load the same version (:class:`ModelAgreement`)."""
        self.reload_requested = False
        before = (self.settings.model, self.bundle_path)
        if self.worker is None and not self._reread_model():
            self.recorder.reload(ok=False)
            return
        if self.worker is not None and self.agreement is not None:  # the main process's path (a reload may change it)
            self.bundle_path = self.agreement.path() or self.bundle_path
        path = self._model_path()
        try:
            bundle = self._load(path)
        except AemonError as exc:
            log.error("bundle.reload_failed", path=str(path), error=str(exc), kept=self.bundle.version)
            self.settings.model, self.bundle_path = before  # serving the old bundle, from where it came
            ok = False
        else:
            self.bundle = bundle if self.agreement is None else self.agreement.choose(bundle, self.bundle)
            self._set_model_metrics()
            freeze_heap(collect=True)
            ok = True
        if self.worker is None:  # one SIGHUP counts once, not once per process
            self.recorder.reload(ok=ok)
        if ok and self.pool is not None and self.shared:
            announce(self.shared, self.bundle.identity, path)
            self.pool.signal(signal.SIGHUP)

    def _reread_model(self) -> bool:
        """Main process: read the settings again (the config file and flags given at start; a process's
        environment cannot change) and take a new ``model`` path. Other settings need a restart: named.

        Returns:
            False when the reload must change nothing: the settings cannot be read (a file deleted, or caught
            half-way through a rewrite), or no longer name the model in use (an empty file, as between a
            truncate and a write: the shipped digit detector is never switched to by a reload).
        """
        if self._reread is None:
            return True
        try:
            fresh = self._reread()
            # None: no new path (the same, or none: see below)
            path = None if fresh.model in (None, self.settings.model) else find_bundle(fresh.model) or Path(fresh.model)
            self._refuse_bundle_in_inbox(path)
        except (AemonError, OSError) as exc:  # OSError: a config folder that cannot be searched
            log.error("reload.settings_failed", error=str(exc), kept=self.bundle.version,
                      hint="nothing was reloaded; fix the settings and reload again")
            return False
        if fresh.model is None and self.settings.model is not None:
            log.error("reload.model_unset", kept=self.bundle.version, model=str(self.settings.model),
                      hint="the settings no longer name a model: the one in use is kept (restart to use the "
                           "shipped bundle)")
            return False
        changed = sorted(name for name in type(fresh).model_fields
                         if name != "model" and getattr(fresh, name) != getattr(self.settings, name))
        if changed:
            log.warning("reload.needs_restart", settings=changed,
                        hint="a reload takes a new model path only; restart the daemon to apply these")
        if path is not None:
            log.info("reload.model_path", before=str(self.settings.model or "the shipped bundle"),
                     after=str(fresh.model))
            self.settings.model = fresh.model  # worker processes started from now on get it too
            self.bundle_path = path
        return True

    def drain(self) -> None:
        """Log the stop: the loop commits each batch before it looks at the stop flag, so none is in hand."""
        log.info("daemon.draining", in_flight=self.in_flight)

    def _set_pending(self) -> None:
        # Every process tracks every entry of the inbox: the main one counts them, each its own claims.
        waiting = self.inbox.pending() if self.worker is None else 0
        self.recorder.pending(waiting + self.in_flight)

    def _count_in_flight(self, n: int) -> None:
        self.in_flight += n

    def _adopt_orphans(self) -> None:
        """Finish or route again the batch folders of daemons that stopped (this one's, earlier)."""
        self._last_adopt = time.monotonic()
        for claims in self.claims.recover(self.router, self.inbox.dir, self.beat, self._finished):
            self._count_in_flight(len(claims))
            self.process(claims)

    def _finished(self, record: dict) -> None:
        """A decision of a stopped daemon, finished from its journal: logged and counted as any other."""
        try:
            arrived = datetime.fromisoformat(record["received_at"]).timestamp()
        except (KeyError, TypeError, ValueError):
            arrived = time.time()
        self.recorder.decided(arrived, record)

    def _gather(self) -> list[Claim]:
        return self.inbox.gather(self.claims, self.settings.batch_size, self.settings.batch_wait_ms / 1000.0,
                                 lambda: self.should_exit, self._count_in_flight, self._waiting)

    def _waiting(self) -> None:
        """A batch waits to fill: the loop is alive, and its claimed entries are pending."""
        self.beat()
        self._set_pending()

    # -- one batch -------------------------------------------------------
    def process(self, claims: list[Claim]) -> None:
        """Decode and score (one model call) the entries of one batch folder, then commit the batch."""
        bundle, prep = self.bundle, self.bundle.preprocessing
        units = [unit for claim in claims for unit in expand(claim, os.fspath(self.root))]
        good: list[Unit] = []
        try:
            for unit in units:
                if unit.error is not None:
                    continue
                try:
                    decode(unit, prep, self.limits)
                    good.append(unit)
                except ItemRejected as exc:
                    unit.error = exc
                self._deciding()
            if good:
                calls, _ = decide(good, bundle, reconstruct=self.settings.mode == "denoise", maps=self.settings.maps,
                                  progress=self._deciding)
                self.recorder.scored(calls)
        except _OutOfGrace:
            log.warning("batch.left_claimed", batch=claims[0].batch_dir.name, entries=len(claims),
                        grace_seconds=self.settings.shutdown_grace_seconds,
                        hint="the stop came while a long batch was being decided: it stays claimed, and the "
                             "next start decides it")
            for unit in units:
                unit.close_source()
            self._count_in_flight(-len(claims))
            return
        self.committer.commit(Batch(claims[0].batch_dir, claims, units, bundle.name, bundle.version, bundle.threshold))

    def _deciding(self) -> None:
        """A step of deciding a batch: a heartbeat; past the shutdown grace after a stop, give the batch up."""
        self.beat()
        if time.monotonic() - self._stop_asked > self.settings.shutdown_grace_seconds:
            raise _OutOfGrace

    def _committed(self, batch: Batch) -> None:
        self._count_in_flight(-len(batch.claims))
        self._set_pending()

    # -- shutdown --------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the workers, the observer, then HTTP; log the counts. Safe after a failed startup."""
        self.ready = False
        self.recorder.ready(False)
        if self.pool is not None:
            self.pool.stop(self.settings.shutdown_grace_seconds)
        self.inbox.stop()
        self.claims.close()
        if self._unconfine is not None:
            self._unconfine()
            self._unconfine = None
        if self.http is not None:
            self.http.stop()
            self.http = None
        self._notify("STOPPING=1")
        if self._notify_sock is not None:
            self._notify_sock.close()
            self._notify_sock = None
        self._restore_signals()
        log.info("worker.stopped" if self.worker is not None else "daemon.stopped", **self.recorder.counts)


def _watchdog_seconds() -> float | None:
    """systemd's watchdog interval (``WATCHDOG_USEC``, meant for this process), or None."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6
