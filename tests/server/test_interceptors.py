"""The one exception-to-status mapping and the gate, on a real grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

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
from server.transport.access import Access
from server.transport.bearer_tokens import BearerTokens
from server.transport.interceptors import (
    GateInterceptor,
    ObservingInterceptor,
    StreamLimits,
    status_for,
)

CASES = [
    (InvalidInput("inputs[0]: bad"), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]: bad"),
    (ModelNotFound("unknown model"), grpc.StatusCode.NOT_FOUND, "unknown model"),
    (ModelNotReady("loading"), grpc.StatusCode.UNAVAILABLE, "loading"),
    (ShuttingDown("draining"), grpc.StatusCode.UNAVAILABLE, "draining"),
    (Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
    (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED, "late"),
    (MessageTooLarge("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED, "too big"),
    (StreamExpired("idle"), grpc.StatusCode.DEADLINE_EXCEEDED, "idle"),
    (Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED, "no token"),
    (ServerError("secret detail"), grpc.StatusCode.INTERNAL, "internal server error"),
    (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL, "internal server error"),
]


@pytest.mark.parametrize(("error", "code", "message"), CASES)
def test_status_for_every_error(error: Exception, code: grpc.StatusCode, message: str) -> None:
    assert status_for(error) == (code, message)


def _identity(data: bytes) -> bytes:
    return data


async def _serve_and_call(
    raising: list[Exception], token: str | None, metadata: tuple = ()
) -> tuple[list[tuple[grpc.StatusCode, str]], CollectorRegistry]:
    """A real server whose test.Boom/Raise method raises raising[int(request)]."""

    async def behave(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise raising[int(request)]

    registry = CollectorRegistry()
    state = ServerState()
    server = grpc.aio.server(
        interceptors=[
            ObservingInterceptor(ServerMetrics(registry), state),
            GateInterceptor(
                state,
                Access(BearerTokens.fixed(token)) if token else None,
                1 << 20,
                StreamLimits(0, 0),
            ),
        ]
    )
    handler = grpc.unary_unary_rpc_method_handler(
        behave, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Boom", {"Raise": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Boom/Raise")
            for index in range(len(raising)):
                try:
                    await call(str(index).encode(), timeout=5, metadata=metadata)
                except grpc.aio.AioRpcError as error:
                    results.append((error.code(), error.details()))
    finally:
        await server.stop(0)
    return results, registry


def test_interceptor_maps_errors_and_hides_unknown_detail(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="server.transport.interceptors")
    errors = [case[0] for case in CASES]
    results, registry = asyncio.run(_serve_and_call(errors, None))
    assert results == [(code, message) for _, code, message in CASES]
    assert "secret detail" in caplog.text  # the detail goes to the log, not to the client
    labels = {"grpc_service": "test.Boom", "grpc_method": "Raise", "grpc_type": "unary"}
    assert registry.get_sample_value("grpc_server_started_total", labels) == len(CASES)
    assert (
        registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "INTERNAL"})
        == 2
    )


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer s3cret"),), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_gate_checks_the_bearer_token(metadata: tuple, code: grpc.StatusCode) -> None:
    results, _ = asyncio.run(_serve_and_call([InvalidInput("reached")], "s3cret", metadata))
    assert results[0][0] is code


def test_a_handler_slower_than_the_idle_limit_leaves_a_busy_stream_open() -> None:
    limits = StreamLimits(idle_s=0.05, max_s=0)

    async def requests() -> AsyncIterator[int]:
        for index in range(3):
            yield index  # each one there as soon as it is asked for

    async def handle() -> list[int]:
        handled = []
        async for request in limits.guard(requests()):
            await asyncio.sleep(0.1)  # the work on one request: twice the idle limit
            handled.append(request)
        return handled

    assert asyncio.run(handle()) == [0, 1, 2]


def test_a_silent_client_ends_the_stream_as_idle() -> None:
    limits = StreamLimits(idle_s=0.05, max_s=0)

    async def requests() -> AsyncIterator[int]:
        yield 0
        await asyncio.Event().wait()  # then nothing more

    async def handle() -> list[int]:
        handled = []
        with pytest.raises(StreamExpired, match="stream_idle_timeout_s"):
            async for request in limits.guard(requests()):
                handled.append(request)
        return handled

    assert asyncio.run(handle()) == [0]
