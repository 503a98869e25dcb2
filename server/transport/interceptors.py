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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    MessageTooLarge,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServerError,
    ShuttingDown,
    StreamExpired,
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
    MessageTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
HEALTH_SERVICE = "grpc.health.v1.Health"
# RPCs the drain waits for; health watches and reflection streams would never end.
TRACKED_SERVICES = ("inference.GRPCInferenceService", "finetune.v1.Classifier")
INTERNAL_MESSAGE = "internal server error"
# gRPC's server pushback: retry policies wait this many milliseconds before the next attempt.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
# Methods that carry tensors or images get the configured message limit; every other method
# (health, metadata, configuration, statistics, reflection) this much.
SMALL_MESSAGE_BYTES = 64 * 1024
PAYLOAD_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelStreamInfer",
        "/finetune.v1.Classifier/Classify",
        "/finetune.v1.Classifier/ClassifyStream",
    }
)


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
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    deserializer: Callable[[bytes], Any] | None = None,
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
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _Guard:
    """Around one RPC: metrics, in-flight tracking, exception -> status mapping."""

    def __init__(
        self, interceptor: ObservingInterceptor, labels: tuple[str, str, str], tracked: bool
    ) -> None:
        self._interceptor = interceptor
        self._labels = labels
        self._tracked = tracked

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
            pushback = getattr(error, "retry_after_s", None)
            trailing = () if pushback is None else ((PUSHBACK_KEY, str(int(pushback * 1000))),)
            await self._context.abort(code, message, trailing)  # raises AbortError
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
        if _is_refusal(handler):
            # Refused at the door: counted in the gRPC metrics, but not an arrival the drain
            # waits for, so clients retrying against a draining server do not prolong it.
            return self._wrap(method, handler, tracked=False)
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler, tracked=True)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, full_method: str, handler: grpc.RpcMethodHandler, *, tracked: bool
    ) -> grpc.RpcMethodHandler:
        service, method = _split_method(full_method)
        labels = (service, method, _rpc_type(handler))
        tracked = tracked and service in TRACKED_SERVICES

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):

                async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    async with _Guard(self, labels, tracked).bind(context):
                        async for item in behavior(request, context):
                            yield item

                return stream

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _Guard(self, labels, tracked).bind(context):
                    return await behavior(request, context)

            return call

        return _replace_behavior(handler, wrap)


class _Oversized:
    """Stands in for a request message over its method's limit; it was never parsed."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit

    def error(self) -> MessageTooLarge:
        return MessageTooLarge(
            f"request message is {self.size} bytes; this method accepts {self.limit}"
        )


def _limited_deserializer(
    deserializer: Callable[[bytes], Any] | None, limit: int
) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if len(data) > limit:
            return _Oversized(len(data), limit)
        return deserializer(data) if deserializer is not None else data

    return deserialize


def _refused_deserializer(data: bytes) -> None:
    """Refused calls never parse their body."""
    return None


class StreamLimits:
    """Ends a request stream idle for ``idle_s`` or open for ``max_s`` (0: no limit), and,
    for inference streams, once the server drains."""

    # How often a waiting stream looks at the drain flag.
    CHECK_S = 0.25

    def __init__(self, idle_s: float, max_s: float) -> None:
        self.idle_s = idle_s
        self.max_s = max_s

    def _expiry(self, started: float, last: float) -> StreamExpired | None:
        now = time.monotonic()
        if self.max_s > 0 and now - started >= self.max_s:
            return StreamExpired(
                f"stream open longer than {self.max_s:g} s (stream_max_duration_s)"
            )
        if self.idle_s > 0 and now - last >= self.idle_s:
            return StreamExpired(f"stream idle for {self.idle_s:g} s (stream_idle_timeout_s)")
        return None

    async def guard(
        self, requests: AsyncIterator[Any], stopping: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[Any]:
        """The requests, each checked against its method's size limit, within the limits.

        The next read is never cancelled while the stream lives (a cancelled read could lose
        a message); the wait for it wakes up every ``CHECK_S`` to look at the limits.
        """
        started = last = time.monotonic()
        iterator = aiter(requests)
        reading: asyncio.Future[Any] | None = None
        try:
            while True:
                if stopping():
                    raise ShuttingDown("server is shutting down; reconnect to another replica")
                expired = self._expiry(started, last)
                if expired is not None:
                    raise expired
                if reading is None:
                    reading = asyncio.ensure_future(anext(iterator))
                done, _ = await asyncio.wait({reading}, timeout=self.CHECK_S)
                if not done:
                    continue
                finished, reading = reading, None
                try:
                    request = finished.result()
                except StopAsyncIteration:
                    return
                last = time.monotonic()
                yield _checked(request)
        finally:
            if reading is not None:
                reading.cancel()


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Admission at the door: the bearer token and the draining gate (from metadata, before
    the body is parsed), per-method message limits, and limits on request streams.

    Health is exempt from the token and the drain, so Kubernetes probes keep working.
    """

    def __init__(
        self,
        state: ServerState,
        token: str | None,
        max_message_bytes: int,
        streams: StreamLimits,
    ) -> None:
        self.state = state
        self._expected = f"Bearer {token}".encode() if token else None
        self.max_message_bytes = max_message_bytes
        self.streams = streams
        # method -> (inner handler, limited handler): wrapped once, so the observing
        # interceptor's own cache keeps hitting.
        self._limited_handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

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
        if handler is None:
            return handler
        if refusal is not None:
            return _refusing(handler, refusal)
        method = handler_call_details.method
        cached = self._limited_handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        limit = self.max_message_bytes if method in PAYLOAD_METHODS else SMALL_MESSAGE_BYTES
        service, _ = _split_method(method)
        limited = self._limited(handler, limit, drains=service in TRACKED_SERVICES)
        self._limited_handlers[method] = (handler, limited)
        return limited

    def _limited(
        self, handler: grpc.RpcMethodHandler, limit: int, drains: bool
    ) -> grpc.RpcMethodHandler:
        streams, state = self.streams, self.state

        def stopping() -> bool:
            return drains and state.rejecting

        def guarded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            return streams.guard(requests, stopping)

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if handler.request_streaming:
                return _on_requests(behavior, guarded)
            return _on_requests(behavior, _checked)

        return _replace_behavior(
            handler, wrap, _limited_deserializer(handler.request_deserializer, limit)
        )


def _checked(request: Any) -> Any:
    if isinstance(request, _Oversized):
        raise request.error()
    return request


def _on_requests(behavior: Callable[..., Any], adapt: Callable[[Any], Any]) -> Callable[..., Any]:
    """``behavior`` with its request (or request iterator) passed through ``adapt`` first."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Any) -> Any:
            async for item in behavior(adapt(request), context):
                yield item

        return stream

    async def call(request: Any, context: Any) -> Any:
        return await behavior(adapt(request), context)

    return call


def _is_refusal(handler: grpc.RpcMethodHandler) -> bool:
    behaviors = (
        handler.unary_unary,
        handler.unary_stream,
        handler.stream_unary,
        handler.stream_stream,
    )
    return any(getattr(b, "is_refusal", False) for b in behaviors if b is not None)


def _refusing(handler: grpc.RpcMethodHandler, refusal: ServerError) -> grpc.RpcMethodHandler:
    def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def refuse_stream(request: Any, context: Any) -> Any:
                raise refusal
                yield  # an async generator, like the behaviour it replaces

            refuse_stream.is_refusal = True  # type: ignore[attr-defined]
            return refuse_stream

        async def refuse(request: Any, context: Any) -> Any:
            raise refusal

        refuse.is_refusal = True  # type: ignore[attr-defined]
        return refuse

    return _replace_behavior(handler, wrap, _refused_deserializer)
