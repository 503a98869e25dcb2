"""The Prometheus endpoint: ``GET /metrics`` only, on its own bind address, with timeouts.

prometheus_client's ``start_http_server`` answers every path with the metrics and keeps a
thread per connection as long as the client likes; this one answers 404 off ``/metrics`` and
drops connections idle for ``timeout_s`` (``--metrics-timeout-s``), so a slow or scanning
client cannot pin threads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

TIMEOUT_S = 10.0
PATH = "/metrics"


class _Handler(WSGIRequestHandler):
    timeout = TIMEOUT_S  # socket timeout for reading the request and writing the answer

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


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
