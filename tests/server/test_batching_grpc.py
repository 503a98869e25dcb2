"""Dynamic batching through the real server: own answers, batch sizes, queue, deadline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from busy_server import (
    BUSY_ROWS,
    LABELS,
    WAIT_S,
    arrived,
    busy_done,
    make_slow_repository,
    occupy,
    one_image,
    wait_for,
)
from grpc_helpers import infer_async, infer_request, probabilities
from server_harness import RunningServer, server_config

from protocol.inference import grpc_service_pb2_grpc as pb_grpc
from server.config import ServerConfig


def test_concurrent_distinct_inputs_get_their_own_answers(model_repository: Path) -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (1 + i % 2, 32, 32, 3), dtype=np.uint8) for i in range(48)]
    session = ort.InferenceSession(
        str(model_repository / "classifier" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    expected = [session.run(["probabilities"], {"image": x})[0] for x in inputs]
    # How many of them share a batch depends on how their arrivals spread; that requests do
    # share one is the next test's, where they queue while the model is busy.
    config = server_config(model_repository, max_queue_delay_us=500_000)

    async def scenario(target: str) -> list:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return await asyncio.gather(*(infer_async(stub, x) for x in inputs))

    with RunningServer(config) as server:
        responses = asyncio.run(scenario(server.target))
        for response, want in zip(responses, expected, strict=True):
            assert not isinstance(response, grpc.StatusCode), response
            np.testing.assert_allclose(probabilities(response), want, atol=1e-6)
        assert server.sample("inference_rows_total", LABELS) == sum(x.shape[0] for x in inputs)


@pytest.fixture
def slow_repository(tmp_path: Path) -> Path:
    return make_slow_repository(tmp_path / "slow")


def test_requests_queued_during_a_compute_share_one_batch(slow_repository: Path) -> None:
    rng = np.random.default_rng(1)
    inputs = [rng.integers(0, 256, (1 + i % 2, 64, 64, 3), dtype=np.uint8) for i in range(4)]
    session = ort.InferenceSession(
        str(slow_repository / "classifier" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    expected = [session.run(["probabilities"], {"image": x})[0] for x in inputs]
    with (
        RunningServer(_busy_config(slow_repository)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        busy = occupy(server, stub, 2, max_done=0)
        futures = [stub.ModelInfer.future(infer_request(x), timeout=WAIT_S) for x in inputs]

        def queued_behind_a_busy_one() -> bool:
            done = busy_done(server)
            depth = server.registry.get_sample_value("inference_queue_depth", LABELS)
            return busy_done(server) == done <= 1 and depth == 2 - done - 1 + len(inputs)

        # Every small request is in the queue, none taken yet, while a busy one (a full batch
        # of its own) is ahead of them: they leave together, however their arrivals spread.
        wait_for(queued_behind_a_busy_one)
        for future in busy:
            future.result()
        for future, want in zip(futures, expected, strict=True):
            np.testing.assert_allclose(probabilities(future.result()), want, atol=1e-6)
        rows = sum(x.shape[0] for x in inputs)
        assert server.sample("inference_batch_size_count", LABELS) == 2 + 1
        assert server.sample("inference_batch_size_sum", LABELS) == 2 * BUSY_ROWS + rows


def _busy_config(repository: Path, **overrides: object) -> ServerConfig:
    # Warming one size only: the tests never time a batch, and warming every size of the slow
    # model up to BUSY_ROWS would cost more than the tests themselves.
    values: dict = {"max_batch_size": BUSY_ROWS, "warmup_batch_sizes": (1,), **overrides}
    return server_config(repository, **values)


def test_full_queue_answers_resource_exhausted(slow_repository: Path) -> None:
    config = _busy_config(slow_repository, max_queue_size=2)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # One computing and two queued: the queue is full for a whole compute at least.
        busy = occupy(server, stub, 3, max_done=0)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(infer_request(one_image()), timeout=WAIT_S)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        for future in busy:
            future.result()
        assert server.sample("inference_requests_total", {**LABELS, "outcome": "rejected"}) == 1


def test_expired_deadline_is_not_computed(slow_repository: Path) -> None:
    with (
        RunningServer(_busy_config(slow_repository)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # At least one full busy compute (about 2 s on an idle core) is ahead of the late
        # request, whose deadline of 0.5 s runs from its arrival at the server (the OIP
        # timeout parameter). A client-side deadline would race: the client's cancel reaches
        # the server before the server's own copy of the deadline has passed.
        busy = occupy(server, stub, 3, max_done=1)
        late = infer_request(one_image())
        late.parameters["timeout"].int64_param = 500_000
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(late, timeout=WAIT_S)
        assert refused.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        for future in busy:
            future.result()
        outcome = {**LABELS, "outcome": "deadline"}
        wait_for(lambda: server.sample("inference_requests_total", outcome) == 1)
        # The late request never reached onnxruntime: only the busy requests' rows ran.
        assert server.sample("inference_rows_total", LABELS) == 3 * BUSY_ROWS


def test_cancelled_request_is_not_computed(slow_repository: Path) -> None:
    with (
        RunningServer(_busy_config(slow_repository)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        busy = occupy(server, stub, 3, max_done=0)
        doomed = stub.ModelInfer.future(infer_request(one_image()), timeout=WAIT_S)
        # Arrived with at most one busy request done: a full busy compute is still ahead of
        # it, so it is cancelled before it could run.
        wait_for(arrived(server, 4, max_done=1))
        assert doomed.cancel()
        for future in busy:
            future.result()
        outcome = {**LABELS, "outcome": "cancelled"}
        wait_for(lambda: server.sample("inference_requests_total", outcome) == 1)
        assert server.sample("inference_rows_total", LABELS) == 3 * BUSY_ROWS


def test_lone_request_is_not_held_for_the_queue_delay(model_repository: Path) -> None:
    # With nothing else on its way, waiting 20 s for company would only add latency.
    config = server_config(model_repository, max_queue_delay_us=20_000_000)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = infer_request(np.zeros((1, 32, 32, 3), np.uint8))
        stub.ModelInfer(request, timeout=10)
        started = time.monotonic()
        for _ in range(3):
            stub.ModelInfer(request, timeout=10)
        # Held for the delay, three requests would take a minute; served at once, a fraction.
        assert time.monotonic() - started < 20
