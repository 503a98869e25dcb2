"""Dynamic batching through the real server: own answers, batch sizes, queue, deadline."""

from __future__ import annotations

import asyncio
import time
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
    config = server_config(model_repository, max_queue_delay_us=20_000)

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


def test_expired_deadline_is_not_computed(slow_repository: Path) -> None:
    config = server_config(slow_repository, max_batch_size=1)

    async def scenario(target: str) -> tuple:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            first = asyncio.ensure_future(infer_async(stub, _slow_images(1)[0]))
            await asyncio.sleep(0.03)
            late = await infer_async(stub, _slow_images(2)[1], timeout=0.05)
            return await first, late

    with RunningServer(config) as server:
        first, late = asyncio.run(scenario(server.target))
        assert not isinstance(first, grpc.StatusCode)
        assert late is grpc.StatusCode.DEADLINE_EXCEEDED
        # Give the server a moment to notice; the late request must never reach onnxruntime.
        asyncio.run(asyncio.sleep(0.3))
        assert server.sample("inference_rows_total", LABELS) == 1
        assert server.sample("inference_requests_total", {**LABELS, "outcome": "deadline"}) == 1


def test_cancelled_request_is_not_computed(slow_repository: Path) -> None:
    config = server_config(slow_repository, max_batch_size=1)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer.future(infer_request(_slow_images(1)[0]), timeout=30)
        asyncio.run(asyncio.sleep(0.03))
        doomed = stub.ModelInfer.future(infer_request(_slow_images(2)[1]), timeout=30)
        asyncio.run(asyncio.sleep(0.02))
        assert doomed.cancel()
        first.result()
        asyncio.run(asyncio.sleep(0.3))
        assert server.sample("inference_rows_total", LABELS) == 1
        assert server.sample("inference_requests_total", {**LABELS, "outcome": "cancelled"}) == 1


def test_lone_request_is_not_held_for_the_queue_delay(model_repository: Path) -> None:
    # With nothing else on its way, waiting 0.5 s for company would only add latency.
    config = server_config(model_repository, max_queue_delay_us=500_000)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = infer_request(np.zeros((1, 32, 32, 3), np.uint8))
        stub.ModelInfer(request, timeout=10)
        started = time.monotonic()
        for _ in range(3):
            stub.ModelInfer(request, timeout=10)
        assert (time.monotonic() - started) / 3 < 0.25
