"""Admission control on a real server: concurrent RPCs, per-method message limits, the byte
budget of the batch queue (with gRPC's retry pushback), the token before the body, and limits
on request streams."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_helpers import infer_request
from PIL import Image
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config

from server._proto.finetune.v1 import classifier_pb2, classifier_pb2_grpc
from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_repository(
        tmp_path_factory.mktemp("slow") / "models", input_size=(64, 64), slow_layers=3
    )


async def _concurrent_infers(target: str, count: int, shape: tuple[int, ...]) -> list:
    images = np.zeros(shape, np.uint8)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one() -> object:
            call = stub.ModelInfer(infer_request(images), timeout=60)
            try:
                await call
            except grpc.aio.AioRpcError as error:
                return error
            return grpc.StatusCode.OK

        return await asyncio.gather(*(one() for _ in range(count)))


def test_concurrent_rpcs_beyond_the_limit_are_resource_exhausted(slow_repository: Path) -> None:
    config = server_config(slow_repository, max_concurrent_rpcs=2, max_batch_size=1)
    with RunningServer(config) as server:
        results = asyncio.run(_concurrent_infers(server.target, 8, (1, 64, 64, 3)))
    codes = [r if r is grpc.StatusCode.OK else r.code() for r in results]
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_byte_budget_refuses_with_a_retry_pushback(slow_repository: Path) -> None:
    one_request = 4 * 64 * 64 * 3
    config = server_config(slow_repository, max_queued_bytes=one_request + 1, max_queue_delay_us=0)
    with RunningServer(config) as server:
        results = asyncio.run(_concurrent_infers(server.target, 6, (4, 64, 64, 3)))
    refused = [r for r in results if r is not grpc.StatusCode.OK]
    assert len(refused) < len(results)  # the first one always fits
    assert refused, "no request was over the byte budget"
    for error in refused:
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "byte budget" in error.details()
        assert dict(error.trailing_metadata())["grpc-retry-pushback-ms"] == "100"


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = make_model_repository(tmp_path_factory.mktemp("small") / "models")
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("s3cret\n")
    config = server_config(
        repository,
        auth_token_file=token,
        max_message_bytes=1 << 20,
        stream_idle_timeout_s=0.3,
        stream_max_duration_s=2.0,
    )
    with RunningServer(config) as running:
        yield running


AUTH = (("authorization", "Bearer s3cret"),)


def test_metadata_methods_accept_small_messages_only(small_server: RunningServer) -> None:
    with grpc.insecure_channel(small_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="classifier"), metadata=AUTH).name
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="x" * 100_000), metadata=AUTH)
        assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this method accepts 65536" in error.value.details()
        # Inference keeps the configured limit.
        images = np.zeros((2, 32, 32, 3), np.uint8)
        stub.ModelInfer(infer_request(images), metadata=AUTH, timeout=30)


def test_token_is_checked_before_the_body_is_parsed(small_server: RunningServer) -> None:
    garbage = b"\xff\xff\xff\xff not a protobuf message"
    with grpc.insecure_channel(small_server.target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as error:
            call(garbage, timeout=10)
        assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            call(garbage, timeout=10, metadata=AUTH)
        assert error.value.code() is not grpc.StatusCode.UNAUTHENTICATED


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_idle_stream_is_ended(small_server: RunningServer) -> None:
    hold = threading.Event()

    def requests() -> Iterator[classifier_pb2.ClassifyRequest]:
        yield classifier_pb2.ClassifyRequest(images=[_png()])
        hold.wait(10)  # then silence

    with grpc.insecure_channel(small_server.target) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        responses = stub.ClassifyStream(requests(), metadata=AUTH, timeout=20)
        assert len(next(responses).results) == 1
        with pytest.raises(grpc.RpcError) as error:
            next(responses)
        hold.set()
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream_idle_timeout_s" in error.value.details()


def test_stream_is_ended_after_its_maximum_duration(small_server: RunningServer) -> None:
    stop = threading.Event()

    def requests() -> Iterator[classifier_pb2.ClassifyRequest]:
        while not stop.wait(0.1):  # busy, never idle for 0.3 s
            yield classifier_pb2.ClassifyRequest(images=[_png()])

    answered = 0
    with grpc.insecure_channel(small_server.target) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            for _ in stub.ClassifyStream(requests(), metadata=AUTH, timeout=20):
                answered += 1
        stop.set()
    assert answered > 3
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream_max_duration_s" in error.value.details()
