"""gRPC interceptors: the one place mapping domain exceptions to status codes, gRPC server
metrics, bearer-token auth and the draining gate.

``ObservingInterceptor`` is outermost: it counts every RPC and maps whatever the inner layers
raise. ``GateInterceptor`` refuses RPCs (unauthenticated, draining) by raising domain errors,
so even refusals go through the one mapping.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServerError,
    ShuttingDown,
    Unauthenticated,
)
from server.lifecycle import ServerState
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[ServerError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
HEALTH_SERVICE = "grpc.health.v1.Health"
# RPCs the drain waits for; health watches and reflection streams would never end.
TRACKED_SERVICES = ("inference.GRPCInferenceService", "finetune.v1.Classifier")
INTERNAL_MESSAGE = "internal server error"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception."""
    if isinstance(error, ServerError):
        for kind in type(error).__mro__:
            if kind in STATUS_BY_ERROR:
                return STATUS_BY_ERROR[kind], str(error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _split_method(method: str) -> tuple[str, str]:
    _, _, rest = method.partition("/")
    service, _, name = rest.partition("/")
    return service, name


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _replace_behavior(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    factories = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }
    factory, behavior = factories[(handler.request_streaming, handler.response_streaming)]
    return factory(
        wrap(behavior),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _Guard:
    """Around one RPC: metrics, in-flight tracking, exception -> status mapping."""

    def __init__(self, interceptor: ObservingInterceptor, labels: tuple[str, str, str]) -> None:
        self._interceptor = interceptor
        self._labels = labels
        self._tracked = labels[0] in TRACKED_SERVICES

    async def __aenter__(self) -> None:
        self._started = time.monotonic()
        self._interceptor.metrics.grpc_started.labels(*self._labels).inc()
        if self._tracked:
            self._interceptor.state.enter()

    def _client_left(self, error: BaseException) -> bool:
        """Whether the RPC ended because the client went away, not because of a fault.

        grpc closes a streaming handler's generator (GeneratorExit) when the client
        disconnects mid-stream; anything raised after the client cancelled is its echo.
        """
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            return True
        cancelled = getattr(self._context, "cancelled", None)
        return bool(cancelled is not None and cancelled())

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        code, message = grpc.StatusCode.OK, ""
        if isinstance(error, grpc.aio.AbortError):
            code = self._context.code() or grpc.StatusCode.UNKNOWN
        elif error is not None and self._client_left(error):
            code = grpc.StatusCode.CANCELLED
            log.debug("client left %s: %r", self._labels[1], error)
        elif error is not None:
            code, message = status_for(error)
            if code is grpc.StatusCode.INTERNAL:
                log.error("unhandled error in %s", self._labels[1], exc_info=error)
        # Recorded before abort() sends the status, so a client that has its answer also
        # sees it counted.
        if self._tracked:
            self._interceptor.state.exit()
        metrics = self._interceptor.metrics
        metrics.grpc_handled.labels(*self._labels, code.name).inc()
        metrics.grpc_seconds.labels(*self._labels).observe(time.monotonic() - self._started)
        if error is not None and message:
            await self._context.abort(code, message)  # raises AbortError
        return False

    def bind(self, context: grpc.aio.ServicerContext) -> _Guard:
        self._context = context
        return self


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """gRPC server metrics and the exception-to-status mapping, for every RPC."""

    def __init__(self, metrics: ServerMetrics, state: ServerState) -> None:
        self.metrics = metrics
        self.state = state
        # method -> (inner handler, wrapped handler), so a method is wrapped once, not per call.
        # Holding the inner handler keeps the identity check sound.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, method = _split_method(full_method)
        labels = (service, method, _rpc_type(handler))

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):

                async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    async with _Guard(self, labels).bind(context):
                        async for item in behavior(request, context):
                            yield item

                return stream

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _Guard(self, labels).bind(context):
                    return await behavior(request, context)

            return call

        return _replace_behavior(handler, wrap)


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Refuses RPCs without the bearer token, and inference RPCs while draining.

    Health is exempt from both, so Kubernetes probes keep working.
    """

    def __init__(self, state: ServerState, token: str | None) -> None:
        self.state = state
        self._expected = f"Bearer {token}".encode() if token else None

    def _refusal(self, details: grpc.HandlerCallDetails) -> ServerError | None:
        service, _ = _split_method(details.method)
        if service == HEALTH_SERVICE:
            return None
        if self._expected is not None:
            metadata = dict(details.invocation_metadata or ())
            given = metadata.get("authorization", "")
            given_bytes = given.encode() if isinstance(given, str) else bytes(given)
            if not hmac.compare_digest(given_bytes, self._expected):
                return Unauthenticated("missing or invalid bearer token")
        if self.state.rejecting and service in TRACKED_SERVICES:
            return ShuttingDown("server is shutting down; retry on another replica")
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        refusal = self._refusal(handler_call_details)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):

                async def refuse_stream(request: Any, context: Any) -> Any:
                    raise refusal
                    yield  # an async generator, like the behaviour it replaces

                return refuse_stream

            async def refuse(request: Any, context: Any) -> Any:
                raise refusal

            return refuse

        return _replace_behavior(handler, wrap)
