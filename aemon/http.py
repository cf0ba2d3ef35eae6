"""``/metrics``, ``/healthz`` and ``/readyz``, served by waitress on a thread.

waitress multiplexes connections on one select loop and answers requests from a small thread
pool, so idle clients cost no thread. Its server gets three rules (:class:`_GuardedServer`) so that
no client can keep a probe out or hold file handles: never more than :data:`MAX_CONNECTIONS`
connections (a new one closes, first, one that does not read its answers, then the oldest with no
request in hand, then the oldest: idle clients that reconnect at once); a connection that sends more
than :data:`MAX_PIPELINED` requests ahead of their answers is closed; a connection with no traffic
for :data:`IDLE_TIMEOUT` seconds is closed; so is one still receiving a request
:data:`REQUEST_TIMEOUT` seconds after its first byte (a client sending its headers a line a
second). A connection in steady use (a scraper on keep-alive) is never cut.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from aemon.logs import get_logger

__all__ = ["HttpServer", "is_loopback"]

log = get_logger()

#: Open connections at once; a new one beyond closes the oldest that is not being answered.
MAX_CONNECTIONS = 32
#: Requests sent ahead of their answers on one connection; one more closes it. Scrapers and probes send one
#: at a time; a client that sends 40 and never reads kept the request threads rendering /metrics for it.
MAX_PIPELINED = 4
#: Output not sent for this long (seconds) marks a connection whose client does not read its answers.
STUCK_OUTPUT = 1.0
#: Connections idle this long are closed (seconds).
IDLE_TIMEOUT = 10
#: A request must arrive whole within this long of its first byte (seconds).
REQUEST_TIMEOUT = 10
#: Connections the kernel queues until they are accepted: enough that clients reconnecting in a loop do not
#: fill it (a full queue drops a probe's connection request, which is then retried a second or more later).
BACKLOG = 1024


class _GuardedChannel(HTTPChannel):
    """waitress's connection, noting when the request it is receiving began."""

    #: When the first byte of the request still being received arrived (epoch seconds).
    request_started = 0.0

    def received(self, data: bytes) -> bool:
        fresh = self.request is None
        try:
            return super().received(data)
        finally:
            if self.request is not None and fresh:
                self.request_started = time.time()
            if len(self.requests) > MAX_PIPELINED:
                self.handle_close()  # answers it would never read, each costing a /metrics rendering


class _GuardedServer(TcpWSGIServer):
    """waitress's TCP server with a hard bound on connections, eviction at the bound, and two timeouts that
    hold whatever a connection is doing."""

    channel_class = _GuardedChannel

    def readable(self) -> bool:
        super().readable()  # its periodic maintenance; it would stop accepting at the limit
        return self.accepting

    def handle_accept(self) -> None:
        channels = list(self.active_channels.values())
        if len(channels) >= self.adj.connection_limit:
            min(channels, key=_eviction_order).handle_close()  # never more than the limit
        super().handle_accept()

    def maintenance(self, now: float) -> None:
        """Close connections with no traffic for :data:`IDLE_TIMEOUT` (also those whose responses the client
        never reads) and those still receiving a request :data:`REQUEST_TIMEOUT` after it began (a client
        sending its headers a line a second). A connection in use is never cut."""
        for channel in list(self.active_channels.values()):
            slow = channel.request is not None and channel.request_started < now - REQUEST_TIMEOUT
            if slow or channel.last_activity < now - IDLE_TIMEOUT:
                # Marked, not closed here: this runs while the loop lists what to watch, and a socket closed
                # after it was listed ended the HTTP thread (EBADF) for good. The loop closes it next.
                channel.will_close = True


def _eviction_order(channel: HTTPChannel) -> tuple[int, float]:
    """Which connection a new one closes at the limit, smallest first: one that does not read its answers
    (requests pipelined behind the one being answered, or output that has not moved for a second), then
    one with no request in hand (idle, or still sending its headers), oldest first; a connection being
    answered, its answer still leaving, goes last (closing it then cut a probe's answer in half)."""
    waiting = bool(channel.total_outbufs_len)
    if len(channel.requests) > 1 or (waiting and channel.last_activity < time.time() - STUCK_OUTPUT):
        return 0, channel.creation_time
    return (2 if channel.requests or waiting else 1), channel.creation_time


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts local connections (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ToStructlog(logging.Handler):
    """waitress's own log lines as ``http.server`` events (one JSON line each, like every event)."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        getattr(log, level if level in ("debug", "info", "warning", "error") else "error")(
            "http.server", message=record.getMessage())


class HttpServer:
    """Serves the endpoints on a thread; keeps the server handle for shutdown.

    Args:
        host: Address to bind.
        port: Port to bind (0 picks a free one; see :attr:`port`).
        registry: The metrics registry to expose.
        health: True while the daemon loop is alive.
        ready: True once the model is loaded and the folders are usable.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 health: Callable[[], bool], ready: Callable[[], bool]) -> None:
        self.host, self._port = host, port
        self.registry, self.health, self.ready = registry, health, ready
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.effective_port) if self._server is not None else self._port

    def app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """The WSGI application."""
        path = environ.get("PATH_INFO", "")
        ctype = "text/plain; charset=utf-8"
        if path == "/metrics":
            # The format the scraper asks for: Prometheus asks for OpenMetrics, the only one with an info type
            # (aemon_model_info); the classic text format (curl, no Accept) calls it a gauge.
            encode, ctype = choose_encoder(environ.get("HTTP_ACCEPT", ""))
            code, body = 200, encode(self.registry)
        elif path == "/healthz":
            ok = self.health()
            code, body = (200, b"ok\n") if ok else (503, b"loop stalled\n")
        elif path == "/readyz":
            ok = self.ready()
            code, body = (200, b"ready\n") if ok else (503, b"not ready\n")
        else:
            code, body = 404, b"not found: try /metrics, /healthz or /readyz\n"
        status = {200: "200 OK", 404: "404 Not Found", 503: "503 Service Unavailable"}[code]
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]

    def start(self) -> None:
        """Bind and serve on a background thread (raises OSError if the port is taken)."""
        waitress_log = logging.getLogger("waitress")
        waitress_log.handlers[:] = [_ToStructlog()]
        waitress_log.propagate = False
        waitress_log.setLevel(logging.WARNING)
        # One line per queued request under a flood ("Task queue depth is N"): not worth a log line each.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self._server = _GuardedServer(
            self.app, host=self.host, port=self._port, threads=2, connection_limit=MAX_CONNECTIONS,
            channel_timeout=IDLE_TIMEOUT, cleanup_interval=1, backlog=BACKLOG, ident="aemon", asyncore_use_poll=True,
            log_socket_errors=False, clear_untrusted_proxy_headers=True,
        )
        self._thread = threading.Thread(target=self._server.run, name="aemon-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close every connection and the listening socket, stop the request threads, join."""
        server, self._server = self._server, None
        if server is not None:
            server.close()  # the listening socket and the loop's trigger
            while server._map:  # the select loop ends once its map is empty
                for channel in list(server._map.values()):
                    channel.close()
            server.task_dispatcher.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
