"""A small threaded HTTP server: ``/metrics``, ``/healthz``, ``/readyz``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HttpServer"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: CollectorRegistry
    health: Callable[[], bool]
    ready: Callable[[], bool]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = self.server.health()
            self._send(200 if ok else 503, b"ok\n" if ok else b"loop stalled\n")
        elif path == "/readyz":
            ok = self.server.ready()
            self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # keep access lines off the event log
        pass


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
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return self._server.server_address[1] if self._server else self._port

    def start(self) -> None:
        """Bind and serve on a background thread (raises OSError if the port is taken)."""
        server = _Server((self.host, self._port), _Handler)
        server.registry, server.health, server.ready = self.registry, self.health, self.ready
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="aemon-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
