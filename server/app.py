"""The composition root: builds every part of the server from one ServerConfig.

Domain objects (metrics, model manager, handlers, drain state) are wired here; the gRPC side
is assembled by ``server.transport.grpc_server`` and the HTTP/REST side, over the same
handlers and drain state, by ``server.transport.http_server``, so this module imports no grpc,
no aiohttp and no ``*_pb2``. ``build_server`` binds and starts the gRPC server (health
NOT_SERVING), the HTTP/REST listener and the metrics port;
``ServerHandle.start`` loads and warms up the models, turns health SERVING and starts polling
the repository; ``serve`` runs it all until SIGTERM and drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector

from server.capture import CapturePolicy, CaptureWriter
from server.config import ServerConfig, config_as_dict
from server.decode_budget import DecodeMemoryBudget
from server.decode_pool import DecodePool
from server.decode_processes import DecodeProcesses
from server.errors import ConfigError, ModelLoadError
from server.handlers.byte_budget import ByteBudget
from server.handlers.classification import ClassificationHandler
from server.handlers.inference import InferenceHandler
from server.lifecycle import DrainTarget, ServerState, drain
from server.metrics import ServerMetrics
from server.metrics_http import start_metrics_server
from server.model_manager import ManagerSettings, ModelManager, RetiredCallback
from server.prediction_monitor import PredictionMonitors
from server.preprocess import ImageLimits
from server.thread_plan import ThreadPlan, plan_from_settings
from server.transport.access import Access
from server.transport.grpc_server import GrpcEndpoint, format_address, start_grpc_server
from server.transport.http_server import HttpEndpoint, start_http_server
from server.transport.model_config import parse_model_config
from server.version_loader import LoadSettings, VersionLoader
from server.version_records import VersionRecords, default_state_dir

log = logging.getLogger(__name__)

S = TypeVar("S")


@dataclass
class ServerHandle(DrainTarget):
    """A running server: its bound ports and the parts tests and the CLI need."""

    config: ServerConfig
    grpc: GrpcEndpoint
    metrics_port: int | None
    registry: CollectorRegistry
    metrics: ServerMetrics
    manager: ModelManager
    state: ServerState
    inference: InferenceHandler
    decoder: DecodePool
    capture: CaptureWriter | None = None
    rest: HttpEndpoint | None = None  # the HTTP/REST listener (None: http_port -1)
    _http: Any = None
    _poll: asyncio.Task[None] | None = field(default=None)
    _stopped: bool = False

    async def start(self) -> None:
        """Load and warm up the models, then report SERVING and start polling."""
        await self.manager.refresh()
        if not self.manager.is_ready:
            raise ModelLoadError(
                f"no model version could be loaded from {self.config.model_repository}"
            )
        await self.grpc.health.set_serving(True)
        if self.config.poll_interval_s > 0:
            self._poll = asyncio.get_running_loop().create_task(
                self.manager.poll_forever(self.config.poll_interval_s)
            )
        log.info("serving models %s on port %d", self.manager.model_names(), self.port)

    @property
    def port(self) -> int:
        return self.grpc.port

    async def set_not_serving(self) -> None:
        self.inference.is_draining = True
        await self.grpc.health.enter_graceful_shutdown()

    async def stop_transport(self, grace: float) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
        if self.rest is not None:
            await self.rest.stop()
        await self.grpc.stop(grace)

    async def unload_models(self) -> None:
        await self.manager.close()
        self.decoder.shutdown()
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        self._stopped = True

    async def drain(self) -> None:
        """The SIGTERM sequence (server.lifecycle.drain) with the configured timings."""
        await drain(
            self,
            drain_delay_s=self.config.drain_delay_s,
            grace_period_s=self.config.grace_period_s,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop at once (tests); use drain() for a graceful shutdown."""
        if self._stopped:
            return
        await self.stop_transport(grace or 0)
        await self.unload_models()


def settings_for(settings_class: type[S], config: ServerConfig) -> S:
    """A part's settings: the fields of ``settings_class``, from the server settings of the same
    names (a part sees what it uses, never the whole config)."""
    names = [spec.name for spec in dataclasses.fields(settings_class)]  # type: ignore[arg-type]
    return settings_class(**{name: getattr(config, name) for name in names})


def create_model_manager(
    config: ServerConfig,
    metrics: ServerMetrics,
    threads: ThreadPlan | None = None,
    on_retired: RetiredCallback | None = None,
) -> ModelManager:
    """The model manager and what it loads versions with: the version loader and the records
    (loading markers, rollout verdicts) in the state directory both share."""
    threads = threads or plan_from_settings(config)
    state_dir = config.state_dir or default_state_dir(config.model_repository)
    records = VersionRecords(state_dir)
    log.info("state directory (loading markers, verdicts off the repository): %s", state_dir)
    loader = VersionLoader(settings_for(LoadSettings, config), threads, metrics, records)
    return ModelManager(
        settings_for(ManagerSettings, config), loader, metrics, parse_model_config, on_retired
    )


def create_decode_pool(config: ServerConfig, threads: ThreadPlan) -> DecodePool:
    """The decode threads, the decode memory budget, and the worker processes if asked for."""
    executor = ThreadPoolExecutor(max_workers=threads.decode_workers, thread_name_prefix="decode")
    processes = None
    if config.decode_isolation == "process":
        processes = DecodeProcesses(config.decode_timeout_s)
    return DecodePool(
        executor,
        config.max_pending_images,
        DecodeMemoryBudget(config.max_decode_memory_mb * 1024 * 1024),
        processes,
        memory_wait_s=config.decode_timeout_s,
    )


def create_capture_writer(config: ServerConfig, metrics: ServerMetrics) -> CaptureWriter | None:
    """The capture for review when ``capture_dir`` is set; an unwritable directory fails start."""
    if config.capture_dir is None:
        return None
    policy = CapturePolicy(
        max_bytes=config.capture_max_mb * 1024 * 1024,
        per_second=config.capture_per_second,
        margin=config.capture_margin,
        random_share=config.capture_random_share,
    )
    writer = CaptureWriter(
        config.capture_dir,
        policy,
        on_captured=lambda reason: metrics.captures.labels(reason).inc(),
        on_dropped=lambda cause: metrics.captures_dropped.labels(cause).inc(),
    )
    log.info("capturing uncertain images for review into %s", config.capture_dir)
    return writer


def _metrics_host(config: ServerConfig) -> str:
    return config.metrics_host if config.metrics_host is not None else config.host


def start_metrics_http(config: ServerConfig, registry: CollectorRegistry) -> WSGIServer | None:
    """The started /metrics endpoint, or None when ``metrics_port`` is -1.

    Raises:
        ConfigError: the port cannot be bound (taken, or the address is not this host's).
    """
    if config.metrics_port < 0:
        return None
    ProcessCollector(registry=registry)  # process_* (CPU, RSS, open fds), per registry
    host = _metrics_host(config)
    try:
        return start_metrics_server(registry, host, config.metrics_port, config.metrics_timeout_s)
    except OSError as error:
        address = format_address(host, config.metrics_port)
        raise ConfigError(f"metrics_port: cannot listen on {address}: {error.strerror}") from None


def describe_listeners(
    config: ServerConfig,
    endpoint: GrpcEndpoint,
    metrics_port: int | None,
    rest: HttpEndpoint | None = None,
) -> str:
    """One phrase per listener the server opened, for the start-up log line."""
    listeners = [
        f"gRPC on {format_address(config.host, endpoint.port)} "
        f"({'TLS' if endpoint.uses_tls else 'plaintext'})"
    ]
    if rest is not None:
        listeners.append(
            f"HTTP/REST on {format_address(config.host, rest.port)} "
            f"({'TLS' if rest.uses_tls else 'plaintext'})"
        )
    if endpoint.health_port is not None:
        address = format_address(config.host, endpoint.health_port)
        listeners.append(f"health-only port on {address}")
    if metrics_port is None:
        listeners.append("metrics off")
    else:
        listeners.append(f"metrics on {format_address(_metrics_host(config), metrics_port)}")
    return ", ".join(listeners)


async def build_server(
    config: ServerConfig, registry: CollectorRegistry | None = None
) -> ServerHandle:
    """Bind and start the gRPC and metrics ports; models are loaded by ``handle.start()``."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = ServerMetrics(registry)
    state = ServerState()
    access = Access.of(config)  # reads the token file: a bad one stops the start here
    threads = plan_from_settings(config)
    log.info("%s", threads.describe())
    metrics.cpu_budget.set(threads.budget.cpus)
    monitors = PredictionMonitors(metrics.prediction_metrics)
    manager = create_model_manager(config, metrics, threads, monitors.forget)
    decoder = create_decode_pool(config, threads)
    inference = InferenceHandler(manager, metrics, ByteBudget(config.max_inflight_input_bytes))
    capture = create_capture_writer(config, metrics)
    classification = ClassificationHandler(
        manager,
        metrics,
        decoder,
        ImageLimits(config.max_image_bytes, config.max_image_pixels, config.max_image_aspect),
        config.max_images_per_request,
        monitors,
        capture,
    )
    endpoint = await start_grpc_server(config, inference, classification, metrics, state, access)
    rest = None
    try:
        if config.http_port >= 0:
            rest = await start_http_server(
                config, inference, classification, metrics, state, access
            )
        http = start_metrics_http(config, registry)
    except ConfigError:
        if rest is not None:
            await rest.stop()
        await endpoint.stop(None)
        raise
    metrics_port = http.server_port if http is not None else None
    log.info(
        "%s; settings: %s",
        describe_listeners(config, endpoint, metrics_port, rest),
        config_as_dict(config),
    )
    return ServerHandle(
        config=config,
        grpc=endpoint,
        metrics_port=metrics_port,
        registry=registry,
        metrics=metrics,
        manager=manager,
        state=state,
        inference=inference,
        decoder=decoder,
        capture=capture,
        rest=rest,
        _http=http,
    )


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain; returns the process exit code."""
    handle = await build_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await handle.start()
    except ModelLoadError as error:
        log.error("%s", error)
        await handle.stop()
        return 1
    await stop.wait()
    log.info("shutdown signal received")
    await handle.drain()
    return 0
