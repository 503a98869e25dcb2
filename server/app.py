"""The composition root: builds every part of the server from one ServerConfig.

``build_server`` binds and starts the gRPC server (health NOT_SERVING) and the metrics port;
``ServerHandle.start`` loads and warms up the models, turns health SERVING and starts polling
the repository; ``serve`` runs it all until SIGTERM and drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, start_http_server

from server._proto import POOL
from server._proto.finetune.v1 import classifier_pb2, classifier_pb2_grpc
from server._proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from server.config import ServerConfig, config_as_dict
from server.errors import ConfigError, ModelLoadError
from server.handlers.classification import ClassificationHandler
from server.handlers.inference import InferenceHandler
from server.interceptors import GateInterceptor, ObservingInterceptor
from server.lifecycle import DrainTarget, ServerState, drain
from server.metrics import ServerMetrics
from server.models import ModelManager
from server.preprocess import ImageLimits
from server.transport.classifier import ClassifierServicer
from server.transport.inference import InferenceServicer

log = logging.getLogger(__name__)

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
SERVICES = (INFERENCE_SERVICE, CLASSIFIER_SERVICE)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _read_token(config: ServerConfig) -> str | None:
    if config.auth_token_file is None:
        return None
    try:
        token = config.auth_token_file.read_text().strip()
    except OSError as error:
        raise ConfigError(f"auth_token_file {config.auth_token_file}: {error.strerror}") from None
    if not token:
        raise ConfigError(f"auth_token_file {config.auth_token_file} is empty")
    return token


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        cert = config.tls_cert.read_bytes()
        key = config.tls_key.read_bytes()
        ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    except OSError as error:
        raise ConfigError(f"TLS file {error.filename}: {error.strerror}") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _reflection_pool() -> Any:
    """Our private descriptor pool plus health and reflection, for the reflection service."""
    for module in (health_pb2, reflection_pb2):
        with contextlib.suppress(TypeError):  # already added
            POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return POOL


@dataclass
class ServerHandle(DrainTarget):
    """A running server: its bound ports and the parts tests and the CLI need."""

    config: ServerConfig
    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    registry: CollectorRegistry
    metrics: ServerMetrics
    manager: ModelManager
    health: health_aio.HealthServicer
    state: ServerState
    inference: InferenceHandler
    decode_executor: ThreadPoolExecutor
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
        for service in ("", *SERVICES):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.config.poll_interval_s > 0:
            self._poll = asyncio.get_running_loop().create_task(
                self.manager.poll_forever(self.config.poll_interval_s)
            )
        log.info("serving models %s on port %d", self.manager.model_names(), self.port)

    async def set_not_serving(self) -> None:
        self.inference.is_draining = True
        await self.health.enter_graceful_shutdown()

    async def stop_transport(self, grace: float) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
        await self.server.stop(grace)

    async def unload_models(self) -> None:
        await self.manager.close()
        self.decode_executor.shutdown(wait=False)
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


async def build_server(
    config: ServerConfig, registry: CollectorRegistry | None = None
) -> ServerHandle:
    """Bind and start the gRPC and metrics ports; models are loaded by ``handle.start()``."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = ServerMetrics(registry)
    state = ServerState()
    manager = ModelManager(config, metrics)
    decode_executor = ThreadPoolExecutor(
        max_workers=config.preprocess_workers, thread_name_prefix="decode"
    )
    inference = InferenceHandler(manager, metrics)
    classification = ClassificationHandler(
        manager,
        metrics,
        decode_executor,
        ImageLimits(config.max_image_bytes, config.max_image_pixels),
    )
    server = grpc.aio.server(
        interceptors=[
            ObservingInterceptor(metrics, state),
            GateInterceptor(state, _read_token(config)),
        ],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(inference), server
    )
    classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(classification), server)
    health = health_aio.HealthServicer()
    for service in ("", *SERVICES):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            *SERVICES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
        pool=_reflection_pool(),
    )
    address = _address(config.host, config.grpc_port)
    credentials = _credentials(config)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise ConfigError(f"cannot bind the gRPC port at {address}")
    await server.start()
    http, metrics_port = None, None
    if config.metrics_port >= 0:
        http, _thread = start_http_server(config.metrics_port, addr=config.host, registry=registry)
        metrics_port = http.server_port
    log.info(
        "gRPC on %s (%s), metrics on %s; settings: %s",
        _address(config.host, port),
        "TLS" if credentials else "plaintext",
        metrics_port,
        config_as_dict(config),
    )
    return ServerHandle(
        config=config,
        server=server,
        port=port,
        metrics_port=metrics_port,
        registry=registry,
        metrics=metrics,
        manager=manager,
        health=health,
        state=state,
        inference=inference,
        decode_executor=decode_executor,
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
