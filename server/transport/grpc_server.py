"""Assembling the gRPC server: credentials, interceptors, options, servicers, health,
reflection and the bound port; and the optional plaintext health-only listener.

The composition root (``server.app``) hands in the handlers and gets back a started server, its
port and a ``HealthReporter``; it never touches grpc's types or the ``*_pb2`` modules.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from protocol import POOL
from protocol.finetune.v1 import classifier_pb2, classifier_pb2_grpc
from protocol.inference import grpc_service_pb2, grpc_service_pb2_grpc
from server.config import ServerConfig
from server.errors import ConfigError
from server.handlers.classification import ClassificationHandler
from server.handlers.inference import InferenceHandler
from server.lifecycle import ServerState
from server.metrics import ServerMetrics
from server.transport import wire
from server.transport.access import Access
from server.transport.classifier import ClassifierServicer
from server.transport.health import HealthServicer
from server.transport.inference import InferenceServicer
from server.transport.interceptors import GateInterceptor, ObservingInterceptor, StreamLimits
from server.transport.tls_files import TlsFiles, TlsMaterial, watch_material

log = logging.getLogger(__name__)

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
SERVICES = (INFERENCE_SERVICE, CLASSIFIER_SERVICE)
# The health-only listener takes tiny messages and a few streams per connection: it is
# reachable without TLS or a token, so it must not be a way around the main port's limits.
# Its Watch streams count against the same max_health_watches as the main port's.
HEALTH_MESSAGE_BYTES = 4096
HEALTH_CONCURRENT_RPCS = 16


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _certificate_configuration(material: TlsMaterial) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca
    )


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and mTLS with ``tls_client_ca``) credentials whose certificate, key and client CA
    are read again when the files change, or None for plaintext.

    grpc asks the fetcher at every new handshake, on its own threads; the files are looked at
    at most once a second, and a pair that does not load keeps the last good one.

    Raises:
        ConfigError: an unreadable or invalid certificate, key or CA file.
    """
    files = TlsFiles.of(config)
    if files is None:
        return None
    material = watch_material(files)

    def fetch() -> Any:
        return _certificate_configuration(material.value) if material.refresh() else None

    return grpc.dynamic_ssl_server_credentials(
        _certificate_configuration(material.value),
        fetch,
        require_client_authentication=files.client_ca is not None,
    )


def _reflection_pool() -> Any:
    """Our private descriptor pool plus health and reflection, for the reflection service."""
    for module in (health_pb2, reflection_pb2):
        with contextlib.suppress(TypeError):  # already added
            POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return POOL


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Keepalive and connection lifetime: dead peers are found, idle connections closed, and
    every connection is eventually closed (GOAWAY), so clients reconnect and new replicas
    get their share of the traffic."""
    options = [
        ("grpc.keepalive_time_ms", round(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout_s * 1000)),
    ]
    lifetimes = (
        ("grpc.max_connection_idle_ms", config.max_connection_idle_s),
        ("grpc.max_connection_age_ms", config.max_connection_age_s),
        ("grpc.max_connection_age_grace_ms", config.max_connection_age_grace_s),
    )
    # 0: no limit, grpc's own default.
    options += [(name, round(seconds * 1000)) for name, seconds in lifetimes if seconds > 0]
    return options


def request_parsers(config: ServerConfig) -> dict[str, Any]:
    """The payload methods' request parsers: bounded walks of the bytes before parsing."""
    inference, classifier = f"/{INFERENCE_SERVICE}/", f"/{CLASSIFIER_SERVICE}/"
    classify = functools.partial(
        wire.parse_classify_request, max_images=config.max_images_per_request
    )
    return {
        f"{inference}ModelInfer": wire.parse_staged_infer_request,
        f"{inference}ModelStreamInfer": wire.parse_staged_infer_request,
        f"{classifier}Classify": classify,
        f"{classifier}ClassifyStream": classify,
    }


class HealthReporter:
    """``grpc.health.v1`` status of the whole server and of each service, in plain terms."""

    def __init__(self, max_watches: int, watch_max_s: float) -> None:
        self.servicer = HealthServicer(max_watches, watch_max_s)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", *SERVICES):
            self.servicer.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service, and no later change (the drain has begun)."""
        self.servicer.enter_graceful_shutdown()


@dataclass
class GrpcEndpoint:
    """A started gRPC server and what the composition root needs of it."""

    server: grpc.aio.Server
    port: int
    health: HealthReporter
    uses_tls: bool
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None

    async def stop(self, grace: float | None) -> None:
        """Stop the main server, then the health-only listener (it reports NOT_SERVING until
        the very end of a drain, so a probe never sees a refused connection before that)."""
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(grace)


async def start_health_listener(
    host: str, port: int, health: HealthReporter, options: list[tuple[str, int]] | None = None
) -> tuple[grpc.aio.Server, int]:
    """A plaintext gRPC server with ``grpc.health.v1`` only, sharing ``health``'s servicer.

    The kubelet's native gRPC probe speaks plaintext, so with TLS on the main port it needs
    this listener; every other service answers UNIMPLEMENTED here, and drain's NOT_SERVING is
    seen on both ports because the servicer is the same object. There is no limit on calls
    at once, so Watch streams (capped by the servicer) never crowd out a Check.

    Returns:
        the started server and its bound port.

    Raises:
        ConfigError: the port cannot be bound.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", HEALTH_MESSAGE_BYTES),
            ("grpc.max_send_message_length", HEALTH_MESSAGE_BYTES),
            ("grpc.max_concurrent_streams", HEALTH_CONCURRENT_RPCS),
            ("grpc.so_reuseport", 0),
            *(options or []),
        ],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    address = format_address(host, port)
    bound = _bind(server, address, None)
    if bound == 0:
        raise ConfigError(f"health_port: cannot listen on {address}")
    await server.start()
    return server, bound


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """The bound port, or 0 when ``address`` cannot be bound (taken, or not this host's)."""
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio raises where older versions returned 0
        return 0


def _create_server(
    config: ServerConfig, metrics: ServerMetrics, state: ServerState, access: Access | None
) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=[
            ObservingInterceptor(metrics, state),
            GateInterceptor(
                state,
                access,
                config.max_message_bytes,
                StreamLimits(config.stream_idle_timeout_s, config.stream_max_duration_s),
                # Not grpc's maximum_concurrent_rpcs: that one counts health watches too, so
                # open watches could starve inference and the probes' own Checks.
                max_concurrent_rpcs=config.max_concurrent_rpcs,
                parsers=request_parsers(config),
            ),
        ],
        options=[
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *connection_options(config),
        ],
    )


async def start_grpc_server(  # noqa: PLR0913  the composition root hands each collaborator in
    config: ServerConfig,
    inference: InferenceHandler,
    classification: ClassificationHandler,
    metrics: ServerMetrics,
    state: ServerState,
    access: Access | None,
) -> GrpcEndpoint:
    """Register every service, bind ``host:grpc_port`` and start, with health NOT_SERVING.

    Args:
        access: the bearer tokens and client names every RPC but health must match.

    Raises:
        ConfigError: unreadable TLS files, or a port that cannot be bound.
    """
    server = _create_server(config, metrics, state, access)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(inference), server
    )
    classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(classification), server)
    health = HealthReporter(config.max_health_watches, config.health_watch_max_s)
    await health.set_serving(False)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [
            *SERVICES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
        pool=_reflection_pool(),
    )
    address = format_address(config.host, config.grpc_port)
    credentials = server_credentials(config)
    port = _bind(server, address, credentials)
    if port == 0:
        raise ConfigError(f"grpc_port: cannot listen on {address}")
    await server.start()
    endpoint = GrpcEndpoint(server, port, health, uses_tls=credentials is not None)
    if config.health_port >= 0:
        try:
            endpoint.health_server, endpoint.health_port = await start_health_listener(
                config.host, config.health_port, health, connection_options(config)
            )
        except ConfigError:
            await server.stop(None)
            raise
    return endpoint
