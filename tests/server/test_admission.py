"""Admission control on a real server: concurrent RPCs, per-method message limits, the byte
budget of the batch queue (with gRPC's retry pushback), the token before the body, and limits
on request streams."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from busy_server import BUSY_BYTES, BUSY_ROWS, WAIT_S, make_slow_repository, occupy, one_image
from grpc_helpers import infer_request
from PIL import Image
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config

from protocol.finetune.v1 import classifier_pb2, classifier_pb2_grpc
from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_slow_repository(tmp_path_factory.mktemp("slow") / "models")


def _refusal(target: str) -> grpc.RpcError:
    """The error of one small request sent while the server is busy."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(infer_request(one_image()), timeout=WAIT_S)
    return error.value


def test_concurrent_rpcs_beyond_the_limit_are_resource_exhausted(slow_repository: Path) -> None:
    config = server_config(
        slow_repository, max_concurrent_rpcs=2, max_batch_size=BUSY_ROWS, warmup_batch_sizes=(1,)
    )
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # Both allowed RPCs stay in flight for a whole compute at least: the next is refused.
        busy = occupy(server, stub, 2, max_done=0)
        assert _refusal(server.target).code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        for future in busy:
            future.result()
        # Once they are answered, a new RPC is admitted again.
        stub.ModelInfer(infer_request(one_image()), timeout=WAIT_S)


def test_byte_budget_refuses_with_a_retry_pushback(slow_repository: Path) -> None:
    config = server_config(
        slow_repository,
        max_queued_bytes=2 * BUSY_BYTES + 1,
        max_batch_size=BUSY_ROWS,
        warmup_batch_sizes=(1,),
    )
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # Two busy requests hold the budget until they are answered: one small image more
        # does not fit.
        busy = occupy(server, stub, 2, max_done=0)
        error = _refusal(server.target)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "byte budget" in error.details()
        assert dict(error.trailing_metadata())["grpc-retry-pushback-ms"] == "100"
        for future in busy:
            future.result()
        stub.ModelInfer(infer_request(one_image()), timeout=WAIT_S)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = make_model_repository(tmp_path_factory.mktemp("small") / "models")
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("s3cret\n")
    config = server_config(
        repository,
        auth_token_file=token,
        max_message_bytes=1 << 20,
        # Only the limit under test: with both, a busy machine could end a stream by the other.
        stream_idle_timeout_s=0.3,
        stream_max_duration_s=0,
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


def test_stream_is_ended_after_its_maximum_duration(tmp_path: Path) -> None:
    # No idle limit: a client thread starved for a moment on a loaded machine is silent, and
    # an idle limit would end the stream first (it did, with 0.3 s against a 0.1 s cadence).
    config = server_config(
        make_model_repository(tmp_path / "models"),
        stream_idle_timeout_s=0,
        stream_max_duration_s=2.0,
    )
    stop = threading.Event()

    def requests() -> Iterator[classifier_pb2.ClassifyRequest]:
        while not stop.wait(0.1):
            yield classifier_pb2.ClassifyRequest(images=[_png()])

    answered = 0
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        opened = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            for _ in stub.ClassifyStream(requests(), timeout=20):
                answered += 1
        open_s = time.monotonic() - opened
        stop.set()
    # Served while it was open, and ended no sooner than its age limit (the server's clock
    # starts after this one).
    assert answered >= 1
    assert open_s >= 2.0, open_s
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream_max_duration_s" in error.value.details()
