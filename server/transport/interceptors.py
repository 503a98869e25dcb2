"""gRPC interceptors: the one place mapping domain exceptions to status codes, gRPC server
metrics, bearer-token auth and the draining gate.

``ObservingInterceptor`` is outermost: it counts every RPC and maps whatever the inner layers
raise. ``GateInterceptor`` refuses RPCs (unauthenticated, draining, over the concurrency
limit) by raising domain errors, so even refusals go through the one mapping.

grpc reads a unary call's whole request message before its handler runs, so the gate turns
every call it may refuse into a request-streaming one: the refusal, or the admission, comes
first, and only an admitted call reads its message (a refused 60 MB message is never read).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import grpc

from server.errors import (
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
from server.transport.access import Access, names_from_auth_context

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[ServerError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    MessageTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
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


# RPCs of services other than inference, classification and health (reflection) at once.
MAX_OTHER_RPCS = 32
# A status message travels in a trailer; gRPC clients refuse trailers over 8-16 KiB with an
# error that hides ours. Names are cut shorter where the message is written (errors.shown).
MAX_STATUS_MESSAGE_CHARS = 2048


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception."""
    if isinstance(error, ServerError):
        for kind in type(error).__mro__:
            if kind in STATUS_BY_ERROR:
                message = str(error)
                if len(message) > MAX_STATUS_MESSAGE_CHARS:
                    message = message[:MAX_STATUS_MESSAGE_CHARS] + "..."
                return STATUS_BY_ERROR[kind], message
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _split_method(method: str) -> tuple[str, str]:
    _, _, rest = method.partition("/")
    service, _, name = rest.partition("/")
    return service, name


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    behaviors = (
        handler.unary_unary,
        handler.unary_stream,
        handler.stream_unary,
        handler.stream_stream,
    )
    return next(b for b in behaviors if b is not None)


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    """The method's type in the .proto (the gate reads unary requests as streams)."""
    declared = getattr(_behavior(handler), "rpc_type", None)
    if declared is not None:
        return str(declared)
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


class _MethodMetrics:
    """One method's gRPC metrics, bound to its labels once: ``labels()`` per call is a lock,
    a tuple and a dict lookup, and every call of the method uses the same children."""

    def __init__(self, metrics: ServerMetrics, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.started = metrics.grpc_started.labels(*labels)
        self.seconds = metrics.grpc_seconds.labels(*labels)
        self._handled_of = metrics.grpc_handled
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._handled_of.labels(*self.labels, code.name)
        return child


class _Guard:
    """Around one RPC: metrics, in-flight tracking, exception -> status mapping."""

    def __init__(
        self, interceptor: ObservingInterceptor, method: _MethodMetrics, tracked: bool
    ) -> None:
        self._interceptor = interceptor
        self._method = method
        self._labels = method.labels
        self._tracked = tracked

    async def __aenter__(self) -> None:
        self._started = time.monotonic()
        self._method.started.inc()
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
        self._method.handled(code).inc()
        self._method.seconds.observe(time.monotonic() - self._started)
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
        metrics = _MethodMetrics(self.metrics, (service, method, _rpc_type(handler)))
        tracked = tracked and service in TRACKED_SERVICES

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):

                async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    async with _Guard(self, metrics, tracked).bind(context):
                        async for item in behavior(request, context):
                            yield item

                return stream

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _Guard(self, metrics, tracked).bind(context):
                    return await behavior(request, context)

            return call

        return _replace_behavior(handler, wrap)


class _Unparsed:
    """Stands in for a request message that was refused while being parsed (over its
    method's size limit, or what its parser refuses); the handler raises ``error``."""

    def __init__(self, error: ServerError) -> None:
        self.error = error


def _limited_deserializer(
    deserializer: Callable[[bytes], Any] | None, limit: int
) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if len(data) > limit:
            return _Unparsed(
                MessageTooLarge(
                    f"request message is {len(data)} bytes; this method accepts {limit}"
                )
            )
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except ServerError as error:  # a parser's refusal (server.transport.wire)
            return _Unparsed(error)

    return deserialize


class RpcSlots:
    """RPCs running at once against ``limit``; beyond it Overloaded (RESOURCE_EXHAUSTED with
    a retry pushback). Used on the event loop only."""

    def __init__(self, limit: int, setting: str) -> None:
        self.limit = limit
        self.active = 0
        self._setting = setting

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise Overloaded(
                f"{self.active} RPCs in flight; the limit ({self._setting}) is {self.limit}"
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class StreamLimits:
    """Ends a request stream idle for ``idle_s`` or open for ``max_s`` (0: no limit), and,
    for inference streams, once the server drains."""

    # How often a waiting stream looks at the drain flag.
    CHECK_S = 0.25

    def __init__(self, idle_s: float, max_s: float) -> None:
        self.idle_s = idle_s
        self.max_s = max_s

    def _expiry(self, started: float, waiting_since: float | None) -> StreamExpired | None:
        now = time.monotonic()
        if self.max_s > 0 and now - started >= self.max_s:
            return StreamExpired(
                f"stream open longer than {self.max_s:g} s (stream_max_duration_s)"
            )
        if self.idle_s > 0 and waiting_since is not None and now - waiting_since >= self.idle_s:
            return StreamExpired(f"stream idle for {self.idle_s:g} s (stream_idle_timeout_s)")
        return None

    async def guard(
        self, requests: AsyncIterator[Any], stopping: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[Any]:
        """The requests, each checked against its method's size limit, within the limits.

        The next read is never cancelled while the stream lives (a cancelled read could lose
        a message); the wait for it wakes up every ``CHECK_S`` to look at the limits. Idle is
        the time a read has waited: the handler's work on the previous request is not the
        client's silence (its next requests may be queued meanwhile).
        """
        started = time.monotonic()
        waiting_since: float | None = None
        iterator = aiter(requests)
        reading: asyncio.Future[Any] | None = None
        try:
            while True:
                if stopping():
                    raise ShuttingDown("server is shutting down; reconnect to another replica")
                expired = self._expiry(started, waiting_since)
                if expired is not None:
                    raise expired
                if reading is None:
                    reading = asyncio.ensure_future(anext(iterator))
                    waiting_since = time.monotonic()
                done, _ = await asyncio.wait({reading}, timeout=self.CHECK_S)
                if not done:
                    continue
                finished, reading, waiting_since = reading, None, None
                try:
                    request = finished.result()
                except StopAsyncIteration:
                    return
                yield _checked(request)
        finally:
            if reading is not None:
                reading.cancel()


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Admission at the door: the bearer token and the draining gate (from metadata), the
    client certificate's names (from the call's auth context), the concurrency limits (each
    decided before the request message is read), per-method message limits and parsers, and
    limits on request streams.

    Health is exempt from the token, the names, the drain and the concurrency limits, so
    Kubernetes probes keep working however many other calls are open; its Watch streams are
    capped by the health servicer itself (server.transport.health).
    """

    def __init__(  # noqa: PLR0913  each limit is handed in explicitly
        self,
        state: ServerState,
        access: Access | None,
        max_message_bytes: int,
        streams: StreamLimits,
        *,
        max_concurrent_rpcs: int = 1024,
        parsers: Mapping[str, Callable[[bytes], Any]] | None = None,
    ) -> None:
        """
        Args:
            access: the bearer tokens and client names every call but health must match
                (None: anyone).
            max_concurrent_rpcs: inference and classification RPCs at once.
            parsers: method -> what parses its request bytes in place of the generated
                deserializer (bounded walks before parsing; server.transport.wire).
        """
        self.state = state
        self.access = access or Access()
        self.max_message_bytes = max_message_bytes
        self.streams = streams
        self.parsers = dict(parsers or {})
        self.rpc_slots = RpcSlots(max_concurrent_rpcs, "max_concurrent_rpcs")
        self.other_slots = RpcSlots(MAX_OTHER_RPCS, "MAX_OTHER_RPCS")
        # method -> (inner handler, limited handler): wrapped once, so the observing
        # interceptor's own cache keeps hitting.
        self._limited_handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _refusal(self, details: grpc.HandlerCallDetails) -> ServerError | None:
        service, _ = _split_method(details.method)
        if service == HEALTH_SERVICE:
            return None
        if self.access.tokens is not None:
            metadata = dict(details.invocation_metadata or ())
            given = metadata.get("authorization", "")
            given_bytes = given.encode() if isinstance(given, str) else bytes(given)
            refusal = self.access.token_refusal(given_bytes)
            if refusal is not None:
                return refusal
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
        deserializer = _limited_deserializer(
            self.parsers.get(method, handler.request_deserializer), limit
        )
        if service == HEALTH_SERVICE:
            limited = _replace_behavior(handler, lambda b: _on_requests(b, _checked), deserializer)
        else:
            slots = self.rpc_slots if service in TRACKED_SERVICES else self.other_slots
            limited = self._admitting(handler, slots, deserializer, service in TRACKED_SERVICES)
        self._limited_handlers[method] = (handler, limited)
        return limited

    def _admitting(
        self,
        handler: grpc.RpcMethodHandler,
        slots: RpcSlots,
        deserializer: Callable[[bytes], Any],
        drains: bool,
    ) -> grpc.RpcMethodHandler:
        """``handler`` as a request-streaming one that checks the client's names and takes a
        slot before it reads."""
        streams, state, access = self.streams, self.state, self.access

        def stopping() -> bool:
            return drains and state.rejecting

        def requests_of(requests: AsyncIterator[Any], context: Any) -> Awaitable[Any]:
            if handler.request_streaming:
                return _ready(streams.guard(requests, stopping))
            return _first_request(context)

        def admit(context: grpc.aio.ServicerContext) -> contextlib.AbstractContextManager[None]:
            if access.checks_names:
                refusal = access.name_refusal(names_from_auth_context(context.auth_context()))
                if refusal is not None:
                    raise refusal
            return slots.held()

        return _reading_after(handler, admit, requests_of, deserializer)


def _checked(request: Any) -> Any:
    if isinstance(request, _Unparsed):
        raise request.error
    return request


async def _ready(value: Any) -> Any:
    return value


async def _first_request(context: Any) -> Any:
    """The one message of a unary call, read only now.

    Read with ``context.read()``, which the request iterator only wraps in an async generator
    (grpc's ``_MessageReceiver``): one generator fewer per call on the hot path.
    """
    request = await context.read()
    if request is grpc.aio.EOF:
        raise InvalidInput("the call carried no request message")
    return _checked(request)


def _reading_after(
    handler: grpc.RpcMethodHandler,
    admit: Callable[[Any], contextlib.AbstractContextManager[None]],
    requests_of: Callable[[AsyncIterator[Any], Any], Awaitable[Any]],
    deserializer: Callable[[bytes], Any],
) -> grpc.RpcMethodHandler:
    """``handler`` with request streaming on: ``admit(context)`` runs before anything is read,
    then ``requests_of`` gives the behaviour its request (unary) or request iterator."""
    behavior = _behavior(handler)
    rpc_type = _rpc_type(handler)
    if handler.response_streaming:

        async def stream(requests: AsyncIterator[Any], context: Any) -> Any:
            with admit(context):
                request = await requests_of(requests, context)
                if inspect.isasyncgenfunction(behavior):
                    async for item in behavior(request, context):
                        yield item
                else:  # writes with context.write()
                    await behavior(request, context)

        stream.rpc_type = rpc_type  # type: ignore[attr-defined]
        return grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    async def call(requests: AsyncIterator[Any], context: Any) -> Any:
        with admit(context):
            return await behavior(await requests_of(requests, context), context)

    call.rpc_type = rpc_type  # type: ignore[attr-defined]
    return grpc.stream_unary_rpc_method_handler(
        call, request_deserializer=deserializer, response_serializer=handler.response_serializer
    )


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
    return bool(getattr(_behavior(handler), "is_refusal", False))


@contextlib.contextmanager
def _raising(refusal: ServerError) -> Iterator[None]:
    raise refusal
    yield  # a generator, as contextmanager needs


def _refusing(handler: grpc.RpcMethodHandler, refusal: ServerError) -> grpc.RpcMethodHandler:
    """A handler that refuses before reading: the request message is never received."""
    refusing = _reading_after(
        handler,
        lambda _: _raising(refusal),
        lambda _, context: _first_request(context),
        _limited_deserializer(None, 0),
    )
    _behavior(refusing).is_refusal = True  # type: ignore[attr-defined]
    return refusing
