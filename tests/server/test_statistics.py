"""ModelStatistics as Triton's tools read it: failures counted, compute counts kept equal."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import grpc
import numpy as np
from grpc_helpers import infer_async, infer_request
from PIL import Image
from repository_factory import make_model_repository, write_failing_version
from server_harness import RunningServer, server_config

from protocol.finetune.v1 import classifier_pb2, classifier_pb2_grpc
from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc


def _statistics(target: str) -> pb.ModelStatistics:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelStatistics(pb.ModelStatisticsRequest(name="classifier"), timeout=10)
    [entry] = response.model_stats
    return entry


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_failures_count_and_compute_counts_stay_equal(model_repository: Path) -> None:
    # A generous queue delay so concurrent requests share batches even on a loaded machine;
    # the batcher stops waiting as soon as no further request is on its way.
    config = server_config(model_repository, max_queue_delay_us=500_000)
    rows = [1 + i % 3 for i in range(12)]

    async def traffic(target: str) -> list[object]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            good = [infer_async(stub, np.zeros((n, 32, 32, 3), np.uint8)) for n in rows]
            bad = infer_async(stub, np.zeros((1, 31, 32, 3), np.uint8))  # wrong shape
            classify = classifier_pb2_grpc.ClassifierStub(channel).Classify(
                classifier_pb2.ClassifyRequest(images=[_png(), _png()], top_k=1), timeout=30
            )
            return list(await asyncio.gather(*good, bad, classify))

    with RunningServer(config) as server:
        results = asyncio.run(traffic(server.target))
        assert results[len(rows)] is grpc.StatusCode.INVALID_ARGUMENT
        assert not any(isinstance(r, grpc.StatusCode) for r in results[: len(rows)])
        entry = _statistics(server.target)

    stats = entry.inference_stats
    requests = len(rows) + 1  # ModelInfer requests that succeeded, plus the Classify one
    assert stats.fail.count == 1
    assert stats.success.count == requests
    counts = {
        "queue": stats.queue.count,
        "compute_input": stats.compute_input.count,
        "compute_infer": stats.compute_infer.count,
        "compute_output": stats.compute_output.count,
    }
    assert set(counts.values()) == {requests}, counts
    assert stats.compute_infer.ns > 0
    assert entry.inference_count == sum(rows) + 2
    assert 1 <= entry.execution_count <= requests


def test_a_failing_computation_counts_as_failure(tmp_path: Path) -> None:
    # Version 2 loads but fails in onnxruntime; without warm-up nothing runs it before serving.
    repo = make_model_repository(tmp_path / "models", config_extra="version_policy { all {} }\n")
    write_failing_version(repo / "classifier" / "2")
    # It has no golden set either, which would refuse it before it serves.
    config = server_config(repo, warmup_timeout_s=0, allow_versions_without_golden_set=True)
    with RunningServer(config) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for version, expected in (("1", None), ("2", grpc.StatusCode.INTERNAL)):
                request = infer_request(np.zeros((1, 32, 32, 3), np.uint8), version=version)
                try:
                    stub.ModelInfer(request, timeout=10)
                    code = None
                except grpc.RpcError as error:
                    code = error.code()
                assert code is expected
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            response = stub.ModelStatistics(
                pb.ModelStatisticsRequest(name="classifier"), timeout=10
            )
    by_version = {e.version: e.inference_stats for e in response.model_stats}
    assert (by_version["1"].success.count, by_version["1"].fail.count) == (1, 0)
    assert (by_version["2"].success.count, by_version["2"].fail.count) == (0, 1)
    assert by_version["2"].fail.ns > 0
    assert by_version["2"].compute_infer.count == 0
