"""A drain clients can follow: a rolling stop of one of two servers behind a round-robin client
that retries UNAVAILABLE elsewhere and then leaves the draining server alone (as Envoy with
outlier detection, or a health-checking gRPC client, would) loses nothing, the drain does not
wait for the grace period, and open inference streams are told to finish.

A client that keeps sending to a server after it answered UNAVAILABLE can see CANCELLED for a
call that reaches the transport in the instant it stops: grpc's stop() cancels calls not yet
handed to a handler, and Python's grpc has no GOAWAY-without-stop to prevent it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
from grpc_helpers import infer_request
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc

IMAGES = np.zeros((1, 32, 32, 3), np.uint8)


class RoundRobin:
    """Sends each request to the next target; UNAVAILABLE is retried on the following one, and
    the target that answered it gets no more requests (Envoy's outlier detection, or a gRPC
    client watching health, does the same; in Kubernetes the endpoint is also removed)."""

    def __init__(self, channels: list[grpc.aio.Channel]) -> None:
        self.stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        self.ejected: set[int] = set()
        self.turn = 0

    async def infer(self) -> tuple[grpc.StatusCode, int]:
        code = grpc.StatusCode.UNKNOWN
        for _attempt in range(2 * len(self.stubs)):
            index = self.turn % len(self.stubs)
            self.turn += 1
            if index in self.ejected:
                continue
            try:
                await self.stubs[index].ModelInfer(infer_request(IMAGES), timeout=20)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code is grpc.StatusCode.UNAVAILABLE:
                    self.ejected.add(index)
                    continue
                return code, index
            return grpc.StatusCode.OK, index
        return code, -1


async def _stream_until_told(stub: pb_grpc.GRPCInferenceServiceStub) -> grpc.StatusCode:
    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        while True:
            yield infer_request(IMAGES)
            await asyncio.sleep(0.05)

    try:
        async for _ in stub.ModelStreamInfer(requests(), timeout=30):
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_rolling_stop_behind_round_robin_loses_nothing(tmp_path: Path) -> None:
    repository = make_model_repository(tmp_path / "models")
    config = server_config(repository, drain_delay_s=0.5, grace_period_s=20.0)
    with RunningServer(config) as first, RunningServer(config) as second:

        async def scenario() -> tuple[list[tuple[grpc.StatusCode, int]], float, grpc.StatusCode]:
            channels = [grpc.aio.insecure_channel(s.target) for s in (first, second)]
            results: list[tuple[grpc.StatusCode, int]] = []
            stop = asyncio.Event()

            async def worker() -> None:
                client = RoundRobin(channels)
                while not stop.is_set():
                    results.append(await client.infer())

            stream = asyncio.ensure_future(
                _stream_until_told(pb_grpc.GRPCInferenceServiceStub(channels[0]))
            )
            workers = [asyncio.ensure_future(worker()) for _ in range(6)]
            # Both serve before the stop (a fixed wait could end first on a loaded machine).
            deadline = time.monotonic() + 30
            while {index for _, index in results} != {0, 1}:
                assert time.monotonic() < deadline, results
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await asyncio.wrap_future(first.submit(first.handle.drain()))
            drained_s = time.monotonic() - started
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)
            stream_code = await stream
            for channel in channels:
                await channel.close()
            return results, drained_s, stream_code

        results, drained_s, stream_code = asyncio.run(scenario())
    codes = {code for code, _ in results}
    assert codes == {grpc.StatusCode.OK}, codes
    assert {index for _, index in results} == {0, 1}
    assert results[-1][1] == 1  # the survivor serves after the stop
    # Retries refused by the draining server are not arrivals: no wait for the grace period.
    assert drained_s < 10, drained_s
    # The open stream was told to go elsewhere rather than holding the drain.
    assert stream_code is grpc.StatusCode.UNAVAILABLE
