"""Assembling the HTTP/REST listener: the aiohttp application, TLS and the bound port.

It runs in the gRPC server's process and event loop, beside it, over the same handlers and
the same drain state. The composition root (``server.app``) hands in the handlers and gets
back a started ``HttpEndpoint``; it never touches aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiohttp import web

from server.config import ServerConfig
from server.errors import ConfigError
from server.handlers.classification import ClassificationHandler
from server.handlers.inference import InferenceHandler
from server.lifecycle import ServerState
from server.metrics import ServerMetrics
from server.transport.access import Access
from server.transport.http_admission import Admission
from server.transport.http_routes import HttpLimits, OipRoutes
from server.transport.tls_files import ReloadingSslContext, TlsFiles

log = logging.getLogger(__name__)

# An idle keep-alive connection is closed after this long (aiohttp's default is an hour).
KEEPALIVE_S = 75.0
# By the time the drain stops the listener nothing should be running; what still is gets
# this long, as the gRPC server's stop(grace) does.
SHUTDOWN_TIMEOUT_S = 0.5


def tls_context(config: ServerConfig) -> ReloadingSslContext | None:
    """The TLS context of ``tls_cert``/``tls_key`` (client certificates required with
    ``tls_client_ca``, mTLS), reloaded when the files change, or None for plaintext: the gRPC
    port's settings.

    Raises:
        ConfigError: an unreadable or invalid certificate, key or CA file.
    """
    files = TlsFiles.of(config)
    return ReloadingSslContext(files) if files is not None else None


def create_http_app(  # noqa: PLR0913  the composition root hands each collaborator in
    inference: InferenceHandler,
    classification: ClassificationHandler,
    metrics: ServerMetrics,
    state: ServerState,
    access: Access | None,
    config: ServerConfig,
) -> web.Application:
    """The aiohttp application: admission middleware and the OIP and classify routes."""
    admission = Admission(state, access, config.max_concurrent_rpcs, metrics)
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
    tls_watch: asyncio.Task[None] | None = None  # reloads the certificate when it changes

    async def stop(self) -> None:
        """Stop listening, close idle connections, give running requests a moment."""
        if self.tls_watch is not None:
            self.tls_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.tls_watch
        await self.runner.cleanup()


async def start_http_server(  # noqa: PLR0913  the composition root hands each collaborator in
    config: ServerConfig,
    inference: InferenceHandler,
    classification: ClassificationHandler,
    metrics: ServerMetrics,
    state: ServerState,
    access: Access | None,
) -> HttpEndpoint:
    """Bind ``host:http_port`` and start serving.

    Raises:
        ConfigError: unreadable TLS files, or a port that cannot be bound.
    """
    tls = tls_context(config)
    app = create_http_app(inference, classification, metrics, state, access, config)
    runner = web.AppRunner(
        app,
        access_log=None,  # as gRPC calls, requests are counted in metrics, not logged
        keepalive_timeout=KEEPALIVE_S,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(
        runner, config.host, config.http_port, ssl_context=tls.context if tls else None
    )
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        host = f"[{config.host}]" if ":" in config.host else config.host
        raise ConfigError(
            f"http_port: cannot listen on {host}:{config.http_port}: {error.strerror}"
        ) from None
    if tls is None:
        return HttpEndpoint(runner, site.port, uses_tls=False)
    watch = asyncio.get_running_loop().create_task(tls.watch(), name="http-tls-watch")
    return HttpEndpoint(runner, site.port, uses_tls=True, tls_watch=watch)
