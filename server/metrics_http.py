"""The Prometheus endpoint: ``GET /metrics`` only, on its own bind address, with timeouts.

prometheus_client's ``start_http_server`` answers every path with the metrics and keeps a
thread per connection as long as the client likes; this one answers 404 off ``/metrics``,
gives each connection ``timeout_s`` (``--metrics-timeout-s``) for the whole exchange (not per
read: a client trickling a byte at a time would reset a per-read timeout forever) and serves
at most ``MAX_CONNECTIONS`` at once, closing any beyond them at once, so a slow or scanning
client cannot pin threads.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

TIMEOUT_S = 10.0
PATH = "/metrics"
# Prometheus scrapes over one connection at a time; a few more cover humans and a second
# scraper of an HA pair.
MAX_CONNECTIONS = 16


class _Handler(WSGIRequestHandler):
    timeout = TIMEOUT_S  # socket timeout of each read and write ...

    def setup(self) -> None:
        super().setup()
        # ... and the whole exchange's deadline: the socket is shut down when it passes.
        self._deadline = threading.Timer(self.timeout, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: closed without a thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away is not the server's error: no traceback."""

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


def _only_metrics(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found; metrics are at /metrics\n"]
        return app(environ, start_response)

    return serve


def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int, timeout_s: float = TIMEOUT_S
) -> WSGIServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    Args:
        timeout_s: socket timeout for reading a request and writing its answer.

    Returns:
        the server; ``server_port`` is the bound port, ``shutdown()`` and ``server_close()``
        stop it.
    """
    server = make_server(
        host,
        port,
        _only_metrics(make_wsgi_app(registry)),
        server_class=_ThreadingServer6 if ":" in host else _ThreadingServer,
        handler_class=type("_TimedHandler", (_Handler,), {"timeout": timeout_s}),
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server
