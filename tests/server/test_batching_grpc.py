"""Dynamic batching through the real server: own answers, batch sizes, queue, deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_helpers import infer_async, infer_request, probabilities
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config

from server._proto.inference import grpc_service_pb2_grpc as pb_grpc

LABELS = {"model": "classifier", "version": "1"}


def test_concurrent_distinct_inputs_get_their_own_answers(model_repository: Path) -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (1 + i % 2, 32, 32, 3), dtype=np.uint8) for i in range(48)]
    session = ort.InferenceSession(
        str(model_repository / "classifier" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    expected = [session.run(["probabilities"], {"image": x})[0] for x in inputs]
    # A generous delay, so requests share batches even when a loaded machine spreads their
    # arrival; the batcher stops waiting once nothing more is on its way.
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
        batches = server.sample("inference_batch_size_count", LABELS)
        rows = server.sample("inference_batch_size_sum", LABELS)
        assert rows == sum(x.shape[0] for x in inputs)
        assert batches < len(inputs), "no batch held more than one request"
        assert server.sample("inference_batch_size_bucket", {**LABELS, "le": "1.0"}) < batches


@pytest.fixture
def slow_repository(tmp_path: Path) -> Path:
    # About 0.1 s of compute per image on one core.
    return make_model_repository(
        tmp_path / "slow", input_size=(64, 64), slow_layers=12, max_queue_delay_us=0
    )


def _slow_images(count: int) -> list[np.ndarray]:
    return [np.full((1, 64, 64, 3), i, dtype=np.uint8) for i in range(count)]


def test_full_queue_answers_resource_exhausted(slow_repository: Path) -> None:
    config = server_config(slow_repository, max_batch_size=1, max_queue_size=2)

    async def scenario(target: str) -> list:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return await asyncio.gather(*(infer_async(stub, x) for x in _slow_images(8)))

    with RunningServer(config) as server:
        results = asyncio.run(scenario(server.target))
        codes = [r for r in results if isinstance(r, grpc.StatusCode)]
        assert codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(results) - len(codes) <= 3  # one computing + two queued
        assert server.sample("inference_requests_total", {**LABELS, "outcome": "rejected"}) == len(
            codes
        )


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll until ``condition()`` holds; fail after a generous ``timeout``."""
    limit = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < limit, "condition not reached"
        time.sleep(0.005)


def _computing(server: RunningServer) -> bool:
    """The one request in flight has left the queue: it is being computed."""
    return server.sample("inference_inflight_requests") == 1 and _queued(server) == 0


def _queued(server: RunningServer) -> float:
    return server.sample("inference_queue_depth", LABELS)


# Sixteen rows of the slow model: about 1.6 s of compute on an idle core, longer on a busy
# one, so a request queued behind them waits far past a deadline of a fraction of that.
BUSY_ROWS = 16


def test_expired_deadline_is_not_computed(slow_repository: Path) -> None:
    config = server_config(slow_repository, max_batch_size=BUSY_ROWS)
    busy = np.zeros((BUSY_ROWS, 64, 64, 3), dtype=np.uint8)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer.future(infer_request(busy), timeout=60)
        _wait_for(lambda: _computing(server))
        # Long enough to reach the server on a loaded machine, far shorter than the compute.
        with pytest.raises(grpc.RpcError) as late:
            stub.ModelInfer(infer_request(_slow_images(2)[1]), timeout=0.4)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        first.result()
        outcome = {**LABELS, "outcome": "deadline"}
        _wait_for(lambda: server.sample("inference_requests_total", outcome) == 1)
        # The late request never reached onnxruntime: only the first request's rows ran.
        assert server.sample("inference_rows_total", LABELS) == BUSY_ROWS


def test_cancelled_request_is_not_computed(slow_repository: Path) -> None:
    config = server_config(slow_repository, max_batch_size=BUSY_ROWS)
    busy = np.zeros((BUSY_ROWS, 64, 64, 3), dtype=np.uint8)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer.future(infer_request(busy), timeout=60)
        _wait_for(lambda: _computing(server))
        doomed = stub.ModelInfer.future(infer_request(_slow_images(2)[1]), timeout=60)
        _wait_for(lambda: _queued(server) == 1)
        assert doomed.cancel()
        first.result()
        outcome = {**LABELS, "outcome": "cancelled"}
        _wait_for(lambda: server.sample("inference_requests_total", outcome) == 1)
        assert server.sample("inference_rows_total", LABELS) == BUSY_ROWS


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
