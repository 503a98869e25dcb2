"""Health and reflection beside the limit that protects inference, on a real server: open
Watch streams are capped and end, never crowd out inference or a probe's Check, and each
watcher sees every change; connections age out (GOAWAY)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import infer_request
from server_harness import RunningServer, server_config

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.errors import ConfigError
from server.transport.grpc_server import connection_options
from server.transport.interceptors import MAX_OTHER_RPCS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "s3cret"
AUTHORIZED = (("authorization", f"Bearer {TOKEN}"),)
WATCHES = 1100
WATCH_LIMIT = 100
# One connection carries at most max_concurrent_streams (128) streams; with ~100 streams on
# each of 12 connections, grpc's transport now and then cancels one before the server sees it.
CONNECTIONS = 40
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def _own_connection(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.fixture
def guarded_server(model_repository: Path, tmp_path: Path) -> Iterator[RunningServer]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = server_config(
        model_repository, auth_token_file=token_file, max_health_watches=WATCH_LIMIT
    )
    with RunningServer(config) as server:
        yield server


async def _open_watches(target: str, count: int) -> tuple[list[object], list[grpc.StatusCode]]:
    """Open ``count`` Watch streams without a token; returns the open calls (each has had
    its first answer) and the status of each refused one."""
    channels = [_own_connection(target) for _ in range(CONNECTIONS)]
    calls = [
        health_pb2_grpc.HealthStub(channels[i % CONNECTIONS]).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120
        )
        for i in range(count)
    ]

    async def first(call: object) -> health_pb2.HealthCheckResponse | grpc.StatusCode:
        try:
            return await call.read()  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as error:
            return error.code()

    answers = await asyncio.gather(*(first(call) for call in calls))
    open_calls = [
        c for c, a in zip(calls, answers, strict=True) if not isinstance(a, grpc.StatusCode)
    ]
    assert all(a.status == SERVING for a in answers if not isinstance(a, grpc.StatusCode))
    refused = [a for a in answers if isinstance(a, grpc.StatusCode)]
    open_calls.append(channels)  # kept open with the calls
    return open_calls, refused


def test_open_watches_do_not_starve_inference_or_checks(guarded_server: RunningServer) -> None:
    async def scenario() -> None:
        opened, refused = await _open_watches(guarded_server.target, WATCHES)
        *calls, channels = opened
        assert len(calls) == WATCH_LIMIT
        exhausted = refused.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert exhausted + refused.count(grpc.StatusCode.CANCELLED) == WATCHES - WATCH_LIMIT
        assert exhausted >= WATCHES - WATCH_LIMIT - 5  # CANCELLED: by the transport, rarely
        # While they are all open: the probe's Check and an authenticated ModelInfer work.
        async with _own_connection(guarded_server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert check.status == SERVING
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            images = np.zeros((1, 32, 32, 3), np.uint8)
            await stub.ModelInfer(infer_request(images), metadata=AUTHORIZED, timeout=30)
        for call in calls:
            call.cancel()  # type: ignore[attr-defined]
        for channel in channels:  # type: ignore[attr-defined]
            await channel.close()

    asyncio.run(scenario())
    # The watches that left freed their places.
    servicer = guarded_server.handle.grpc.health.servicer
    limit = time.monotonic() + 30
    while servicer.watching and time.monotonic() < limit:
        time.sleep(0.01)
    assert servicer.watching == 0


def test_a_watch_ends_after_its_lifetime(model_repository: Path) -> None:
    with (
        RunningServer(server_config(model_repository, health_watch_max_s=0.5)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        started = time.monotonic()
        answers = list(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60))
        assert [a.status for a in answers] == [SERVING]  # then the stream ended with OK
        assert time.monotonic() - started >= 0.5
        again = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(again).status == SERVING
        again.cancel()


def test_every_watcher_sees_the_drain_after_another_left(model_repository: Path) -> None:
    with (
        RunningServer(server_config(model_repository)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        servicer = server.handle.grpc.health.servicer
        leaving = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        staying = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(leaving).status == SERVING
        assert next(staying).status == SERVING
        leaving.cancel()
        limit = time.monotonic() + 30
        while servicer.watching != 1:
            assert time.monotonic() < limit, "the cancelled watch never left"
            time.sleep(0.01)
        seen: list[int] = []

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):  # cancelled below
                seen.extend(answer.status for answer in staying)

        reader = threading.Thread(target=read)
        reader.start()
        server.call(server.handle.set_not_serving())  # the drain's first step
        limit = time.monotonic() + 30
        while not seen:
            assert time.monotonic() < limit, "the remaining watcher never saw NOT_SERVING"
            time.sleep(0.01)
        assert seen == [NOT_SERVING]
        staying.cancel()
        reader.join(timeout=30)


def test_reflection_streams_have_their_own_limit(guarded_server: RunningServer) -> None:
    async def scenario() -> None:
        async with _own_connection(guarded_server.target) as channel:
            info = channel.stream_stream(REFLECTION)
            calls = [info(metadata=AUTHORIZED, timeout=60) for _ in range(MAX_OTHER_RPCS + 8)]
            # A refusal ends its stream; an admitted stream waits for its first request and
            # stays open. Wait for the refusals however slow the machine, then a moment more
            # for any further one.
            ends = [asyncio.ensure_future(call.code()) for call in calls]
            deadline = time.monotonic() + 30
            while sum(end.done() for end in ends) < 8:
                assert time.monotonic() < deadline, "fewer than 8 streams were refused"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            outcomes = [end.result() if end.done() else None for end in ends]
            assert outcomes.count(None) == MAX_OTHER_RPCS
            assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            images = np.zeros((1, 32, 32, 3), np.uint8)
            await stub.ModelInfer(infer_request(images), metadata=AUTHORIZED, timeout=30)
            for call in calls:
                call.cancel()
            await asyncio.gather(*ends)

    asyncio.run(scenario())


def test_connections_are_closed_at_their_age(model_repository: Path) -> None:
    config = server_config(model_repository, max_connection_age_s=0.5, max_connection_age_grace_s=1)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append, try_to_connect=True)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ServerLive(pb.ServerLiveRequest(), timeout=30)

        def closed() -> bool:  # READY, then the server's GOAWAY at about 0.5 s: IDLE
            seen = list(states)  # filled by grpc's thread
            ready = grpc.ChannelConnectivity.READY
            return ready in seen and grpc.ChannelConnectivity.IDLE in seen[seen.index(ready) :]

        limit = time.monotonic() + 30
        while not closed():
            assert time.monotonic() < limit, f"the connection was never closed: {states}"
            time.sleep(0.05)
        stub.ServerLive(pb.ServerLiveRequest(), timeout=30)  # reconnects
        channel.unsubscribe(states.append)


def test_connection_settings_become_grpc_options(tmp_path: Path) -> None:
    options = dict(connection_options(ServerConfig(model_repository=tmp_path)))
    assert options == {
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 20_000,
        "grpc.max_connection_idle_ms": 300_000,
        "grpc.max_connection_age_ms": 600_000,
        "grpc.max_connection_age_grace_ms": 3_600_000,
    }
    unlimited = ServerConfig(model_repository=tmp_path, max_connection_age_s=0)
    assert "grpc.max_connection_age_ms" not in dict(connection_options(unlimited))
    for setting, value in (("keepalive_time_s", 0), ("max_connection_idle_s", -1.0)):
        with pytest.raises(ConfigError, match=setting):
            ServerConfig(model_repository=tmp_path, **{setting: value})
    with pytest.raises(ConfigError, match="max_health_watches"):
        ServerConfig(model_repository=tmp_path, max_health_watches=-1)
