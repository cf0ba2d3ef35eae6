"""The daemon's lifecycle: startup → main loop → shutdown (after uvicorn ``server.py``).

One thread does the work: it takes settled inbox entries, decodes them, scores each batch
with one model call, routes the results and updates the metrics. The watchdog observer and
the HTTP server run on their own threads; signal handlers only set flags.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from aemon.bundle import Bundle, default_bundle_path, load_bundle, utc_now
from aemon.calibration import decide
from aemon.errors import AemonError, EmptyItem, ItemRejected, StartupError, UnsafeItem
from aemon.http import HttpServer
from aemon.images import (
    array_to_input,
    decode_file,
    decode_image,
    input_to_array,
    is_array_name,
    is_image_name,
    read_array,
)
from aemon.inbox import Claim, Inbox, is_ignored
from aemon.logs import get_logger
from aemon.metrics import build
from aemon.oneshot import limits_from
from aemon.records import rejected_record, scored_record
from aemon.router import FOLDERS, Router
from aemon.settings import Settings

__all__ = ["Daemon"]

#: Seconds between loop ticks (flag checks, heartbeat, watchdog ping).
TICK = 0.1
#: ``/healthz`` fails once the loop has not ticked for this long.
HEARTBEAT_STALE = 30.0

log = get_logger()


@dataclass
class _Unit:
    """One file to decode and route: an image, an array, or one image of a folder batch."""

    claim: Claim
    path: Path
    rel: str
    batch: str | None = None
    x: np.ndarray | None = None
    raw: np.ndarray | None = None
    key: str | None = None
    extra: dict = field(default_factory=dict)


class Daemon:
    """Watches ``settings.root/inbox`` and routes every item it finds.

    Args:
        settings: The daemon's settings.
        registry: Prometheus registry for its metrics (a fresh one by default).
        bundle: An already loaded bundle (tests); by default loaded at startup.
    """

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None,
                 bundle: Bundle | None = None) -> None:
        self.settings = settings
        self.root = Path(settings.root)
        self.registry = registry or CollectorRegistry()
        self.metrics = build(self.registry)
        self.bundle = bundle
        self.bundle_path = Path(settings.model) if settings.model else None
        self.router = Router(self.root)
        self.inbox = Inbox(self.root, settings.settle_seconds, settings.rescan_seconds, settings.polling)
        self.limits = limits_from(settings)
        self.http: HttpServer | None = None
        self.should_exit = False
        self.force_exit = False
        self.reload_requested = False
        self.heartbeat = 0.0
        self.ready = False
        self.counts = {"ok": 0, "anomaly": 0, "rejected": 0}
        self._old_handlers: dict[int, object] = {}
        self._notify_addr: str | None = None
        self._notify_sock: socket.socket | None = None

    # -- public ----------------------------------------------------------
    def run(self, until_idle: bool = False) -> int:
        """Start, loop until a signal (or, with ``until_idle``, until the inbox is empty), shut down.

        Returns:
            The exit status (0).

        Raises:
            StartupError: the root, folders, bundle or HTTP port are unusable.
        """
        try:
            self.startup()
            self.main_loop(until_idle)
        except OSError as exc:
            # An infrastructure failure (disk full, folder removed): exit non-zero so the
            # supervisor restarts us; unfinished entries stay claimed and are recovered.
            log.error("daemon.failed", error=str(exc))
            raise AemonError(f"the daemon stopped on a filesystem error: {exc}") from exc
        finally:
            self.shutdown()
        return 0

    def healthy(self) -> bool:
        """True while the loop's heartbeat is fresh."""
        return time.monotonic() - self.heartbeat < HEARTBEAT_STALE

    def is_ready(self) -> bool:
        """True once the model is loaded and the folders are usable."""
        return self.ready and self.bundle is not None and os.access(self.root / "inbox", os.W_OK)

    # -- startup ---------------------------------------------------------
    def startup(self) -> None:
        """Load the bundle, check folders, recover claims, start HTTP and the observer."""
        self._install_signals()
        self._check_folders()
        if self.bundle is None:
            self.bundle = self._load(self.bundle_path or default_bundle_path(self.settings.mode), startup=True)
        self._set_model_metrics()
        for claim in self.inbox.recover():
            log.info("claim.recovered", item=claim.name)
        self.http = HttpServer(self.settings.metrics_host, self.settings.metrics_port, self.registry,
                               self.healthy, self.is_ready)
        try:
            self.http.start()
        except OSError as exc:
            self.http = None
            raise StartupError(f"cannot serve HTTP on {self.settings.metrics_host}:{self.settings.metrics_port}: "
                               f"{exc.strerror}; choose another AEMON_METRICS_PORT") from exc
        self.inbox.start()
        self.heartbeat = time.monotonic()
        self.ready = True
        self._notify("READY=1")
        log.info("daemon.ready", root=str(self.root), model=self.bundle.name, version=self.bundle.version,
                 mode=self.settings.mode, metrics_host=self.settings.metrics_host, metrics_port=self.http.port)

    def _check_folders(self) -> None:
        if not self.root.is_dir():
            raise StartupError(f"root folder {self.root} does not exist; create it or set AEMON_ROOT")
        try:
            for name in ("inbox", *FOLDERS, ".aemon/claims"):
                (self.root / name).mkdir(parents=True, exist_ok=True)
            probe = self.root / ".aemon" / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StartupError(f"root folder {self.root} is not usable: {exc}; "
                               "check its permissions or set AEMON_ROOT") from exc

    def _load(self, path: Path, startup: bool = False) -> Bundle:
        try:
            bundle = load_bundle(path)
        except AemonError as exc:
            if startup:
                raise StartupError(f"cannot load the model: {exc}") from exc
            raise
        log.info("bundle.loaded", path=str(path), name=bundle.name, version=bundle.version,
                 threshold=bundle.threshold)
        return bundle

    def _set_model_metrics(self) -> None:
        b = self.bundle
        self.metrics.threshold.set(b.threshold)
        self.metrics.model_info.info({"name": b.name, "version": b.version, "arch": b.meta.arch})

    # -- signals and notify ----------------------------------------------
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in ((signal.SIGTERM, self._on_exit), (signal.SIGINT, self._on_exit),
                             (signal.SIGHUP, self._on_hup)):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_exit(self, signum, frame) -> None:
        if self.should_exit and signum == signal.SIGINT:
            self.force_exit = True
            raise KeyboardInterrupt
        self.should_exit = True

    def _on_hup(self, signum, frame) -> None:
        self.reload_requested = True

    def _notify(self, message: str) -> None:
        addr = os.environ.get("NOTIFY_SOCKET")
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
        """Tick every 0.1 s: take a batch, process it, until asked to stop."""
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
        """Heartbeat, watchdog ping, pending gauge and a requested reload."""
        self.heartbeat = time.monotonic()
        self._notify("WATCHDOG=1")
        self.metrics.inbox_pending.set(self.inbox.pending())
        if self.reload_requested:
            self.reload_requested = False
            self.reload()

    def reload(self) -> None:
        """Load the bundle again (SIGHUP); on failure keep the old one."""
        path = self.bundle_path or default_bundle_path(self.settings.mode)
        try:
            bundle = self._load(path)
        except AemonError as exc:
            log.error("bundle.reload_failed", path=str(path), error=str(exc), kept=self.bundle.version)
            return
        self.bundle = bundle
        self._set_model_metrics()

    def _gather(self) -> list:
        size = self.settings.batch_size
        claims = self.inbox.take(size)
        if not claims:
            return claims
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000.0
        while len(claims) < size and time.monotonic() < deadline and not self.should_exit:
            time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
            claims += self.inbox.take(size - len(claims))
        return claims

    # -- one batch -------------------------------------------------------
    def process(self, claims: list[Claim]) -> None:
        """Decode, score (one model call), route and record every item of ``claims``."""
        units: list[_Unit] = []
        for claim in claims:
            units.extend(self._expand(claim))
        good: list[_Unit] = []
        for unit in units:
            try:
                self._decode(unit)
                good.append(unit)
            except ItemRejected as exc:
                self._reject(unit, exc)
        if good:
            self._score_and_route(good)
        for claim in claims:
            claim.release()
        self.metrics.inbox_pending.set(self.inbox.pending())

    def _expand(self, claim: Claim) -> list[_Unit]:
        path = claim.path
        if path.is_dir() and not path.is_symlink():
            # Hidden and partial names inside a batch are never taken (nor rejected).
            files = sorted(p for p in path.rglob("*") if (p.is_file() or p.is_symlink())
                           and not any(is_ignored(part) for part in p.relative_to(path).parts))
            if not files:
                unit = _Unit(claim, path, claim.name)
                self._reject(unit, EmptyItem(f"folder {claim.name} holds no files"))
                return []
            return [_Unit(claim, p, p.relative_to(claim.claim_dir).as_posix(), batch=claim.name) for p in files]
        return [_Unit(claim, path, claim.name)]

    def _decode(self, unit: _Unit) -> None:
        if unit.path.is_symlink():
            raise UnsafeItem(f"{unit.rel} is a symbolic link; drop the file itself")
        prep = self.bundle.preprocessing
        if is_array_name(unit.path.name):
            unit.raw, unit.key = read_array(unit.path, self.limits)
            unit.x = array_to_input(unit.raw, prep, unit.rel)
        elif is_image_name(unit.path.name):
            unit.x = decode_image(unit.path, prep, self.limits)[None]
        else:
            unit.x = decode_file(unit.path, prep, self.limits)  # raises UnsupportedType

    def _reject(self, unit: _Unit, exc: ItemRejected) -> None:
        dest = self.router.destination("rejected", unit.rel)
        extra = {"path": self.router.relative(dest)}
        if unit.batch:
            extra["batch"] = unit.batch
        record = rejected_record(item=unit.rel, reason=exc.reason, error=str(exc),
                                 received_at=unit.claim.received_at, decided_at=utc_now(),
                                 model_name=self.bundle.name if self.bundle else None,
                                 model_version=self.bundle.version if self.bundle else None, **extra)
        self._commit(unit, dest, record)
        self.metrics.errors.labels(reason=exc.reason).inc()
        self._decided(unit, record)

    def _score_and_route(self, units: list[_Unit]) -> None:
        bundle = self.bundle
        x = np.concatenate([u.x for u in units])
        started = time.perf_counter()
        if self.settings.mode == "denoise":
            from aemon.scoring import reconstruction_error

            recon = bundle.scorer.reconstruct(x)
            scores = reconstruction_error(x, recon, bundle.scorer.score_fn)
        else:
            recon = None
            scores = bundle.score(x)
        self.metrics.scoring_duration.observe(time.perf_counter() - started)
        self.metrics.batches.inc()
        pvals = bundle.p_values(scores)
        verdicts = decide(scores, bundle.threshold)
        for s in scores:
            self.metrics.reconstruction_error.observe(float(s))
        i = 0
        for unit in units:
            n = len(unit.x)
            sl = slice(i, i + n)
            i += n
            if unit.raw is not None:
                self._route_array(unit, scores[sl], pvals[sl], verdicts[sl], None if recon is None else recon[sl])
            else:
                self._route_image(unit, float(scores[sl][0]), float(pvals[sl][0]), verdicts[sl][0].value,
                                  None if recon is None else recon[sl][0])

    def _common(self, unit: _Unit) -> dict:
        return {"threshold": self.bundle.threshold, "model_name": self.bundle.name,
                "model_version": self.bundle.version, "received_at": unit.claim.received_at,
                "decided_at": utc_now()}

    def _route_image(self, unit: _Unit, score: float, p_value: float, verdict: str, recon) -> None:
        extra = {}
        if unit.batch:
            extra["batch"] = unit.batch
        if recon is not None:
            den = self.router.write_png(recon, "denoised", unit.rel)
            extra["denoised"] = self.router.relative(den)
        dest = self.router.destination(verdict, unit.rel)
        record = scored_record(item=unit.rel, verdict=verdict, score=score, p_value=p_value,
                               path=self.router.relative(dest), **self._common(unit), **extra)
        self._commit(unit, dest, record)
        self.metrics.items.labels(verdict=verdict).inc()
        self._decided(unit, record)

    def _route_array(self, unit: _Unit, scores, pvals, verdicts, recon) -> None:
        raw = unit.raw
        names = np.array([v.value for v in verdicts])
        denoised = None
        if recon is not None:
            den = self.router.write_rows(input_to_array(recon, raw), "denoised", unit.rel, unit.key)
            denoised = self.router.relative(den)
        for verdict in ("ok", "anomaly"):
            idx = np.flatnonzero(names == verdict)
            if idx.size == 0:
                continue
            extra = {}
            if unit.batch:
                extra["batch"] = unit.batch
            if denoised:
                extra["denoised"] = denoised
            dest = self.router.write_rows(raw[idx], verdict, unit.rel, unit.key)
            rows = [{"index": int(j), "score": float(scores[j]), "p_value": float(pvals[j])} for j in idx]
            record = scored_record(
                item=unit.rel, verdict=verdict, score=float(np.max(scores[idx])),
                p_value=float(np.min(pvals[idx])), path=self.router.relative(dest), rows=rows,
                n_rows=int(idx.size), total_rows=len(raw), dtype=str(raw.dtype), **self._common(unit), **extra,
            )
            if unit.key:
                record["array_key"] = unit.key
            self.router.write_record(dest, record)
            self.metrics.items.labels(verdict=verdict).inc(int(idx.size))
            self._decided(unit, record)
        unit.path.unlink()

    def _commit(self, unit: _Unit, dest: Path, record: dict) -> None:
        """Stage the record in the claim, move the item to ``dest``, then commit the record.

        A SIGKILL at any point leaves either the item in its claim (routed again on restart)
        or the item at ``dest`` with its staged record (committed on restart): never an item
        without a record, nor a record twice.
        """
        pending = self.router.stage_record(unit.claim.claim_dir, record)
        try:
            self.router.move_to(unit.path, dest)
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        self.router.commit_record(pending, dest)

    def _decided(self, unit: _Unit, record: dict) -> None:
        now = time.time()
        self.metrics.item_latency.observe(max(0.0, now - unit.claim.arrived))
        self.metrics.last_decision.set(now)
        verdict = record["verdict"]
        if verdict == "rejected":
            self.metrics.items.labels(verdict="rejected").inc()
        self.counts[verdict] = self.counts.get(verdict, 0) + (record.get("n_rows") or 1)
        fields = {k: record.get(k) for k in ("item", "verdict", "score", "threshold", "p_value", "path")}
        if verdict == "rejected":
            fields["reason"] = record["reason"]
        if "n_rows" in record:
            fields["rows"] = record["n_rows"]
        log.info("item.decided", **fields)

    # -- shutdown --------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the observer, then HTTP; log the counts. Safe after a failed startup."""
        if self.should_exit:
            log.info("daemon.draining")
        self.ready = False
        self.inbox.stop()
        if self.http is not None:
            self.http.stop()
            self.http = None
        self._notify("STOPPING=1")
        if self._notify_sock is not None:
            self._notify_sock.close()
            self._notify_sock = None
        self._restore_signals()
        log.info("daemon.stopped", **self.counts)
