"""Assembling the HTTP/REST listener: the aiohttp application, TLS and the bound port.

It runs in the gRPC server's process and event loop, beside it, over the same handlers and
the same drain state. The composition root (``server.app``) hands in the handlers and gets
back a started ``HttpEndpoint``; it never touches aiohttp.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from aiohttp import web

from server.config import ServerConfig
from server.errors import ConfigError
from server.handlers.classification import ClassificationHandler
from server.handlers.inference import InferenceHandler
from server.lifecycle import ServerState
from server.metrics import ServerMetrics
from server.transport.http_admission import Admission
from server.transport.http_routes import HttpLimits, OipRoutes

log = logging.getLogger(__name__)

# An idle keep-alive connection is closed after this long (aiohttp's default is an hour).
KEEPALIVE_S = 75.0
# By the time the drain stops the listener nothing should be running; what still is gets
# this long, as the gRPC server's stop(grace) does.
SHUTDOWN_TIMEOUT_S = 0.5


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The TLS context of ``tls_cert``/``tls_key`` (client certificates required with
    ``tls_client_ca``, mTLS), or None for plaintext: the gRPC port's settings.

    Raises:
        ConfigError: an unreadable or invalid certificate, key or CA file.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.load_verify_locations(cafile=config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except OSError as error:
        if isinstance(error, ssl.SSLError):
            raise ConfigError(f"TLS files: {error}") from None
        raise ConfigError(f"TLS file {error.filename}: {error.strerror}") from None
    return context


def create_http_app(  # noqa: PLR0913  the composition root hands each collaborator in
    inference: InferenceHandler,
    classification: ClassificationHandler,
    metrics: ServerMetrics,
    state: ServerState,
    token: str | None,
    config: ServerConfig,
) -> web.Application:
    """The aiohttp application: admission middleware and the OIP and classify routes."""
    admission = Admission(state, token, config.max_concurrent_rpcs, metrics)
    # client_max_size bounds aiohttp's own readers; ours (http_bodies) apply the same limit.
    app = web.Application(
        middlewares=[admission.middleware], client_max_size=config.max_message_bytes
    )
    limits = HttpLimits(config.max_message_bytes, config.max_images_per_request)
    OipRoutes(inference, classification, limits).add_to(app.router)
    return app


@dataclass
class HttpEndpoint:
    """A started HTTP/REST listener."""

    runner: web.AppRunner
    port: int
    uses_tls: bool

    async def stop(self) -> None:
        """Stop listening, close idle connections, give running requests a moment."""
        await self.runner.cleanup()


async def start_http_server(  # noqa: PLR0913  the composition root hands each collaborator in
    config: ServerConfig,
    inference: InferenceHandler,
    classification: ClassificationHandler,
    metrics: ServerMetrics,
    state: ServerState,
    token: str | None,
) -> HttpEndpoint:
    """Bind ``host:http_port`` and start serving.

    Raises:
        ConfigError: unreadable TLS files, or a port that cannot be bound.
    """
    context = tls_context(config)
    app = create_http_app(inference, classification, metrics, state, token, config)
    runner = web.AppRunner(
        app,
        access_log=None,  # as gRPC calls, requests are counted in metrics, not logged
        keepalive_timeout=KEEPALIVE_S,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.http_port, ssl_context=context)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        host = f"[{config.host}]" if ":" in config.host else config.host
        raise ConfigError(
            f"http_port: cannot listen on {host}:{config.http_port}: {error.strerror}"
        ) from None
    return HttpEndpoint(runner, site.port, uses_tls=context is not None)
