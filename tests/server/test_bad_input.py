"""Property-based bad-input battery: never INTERNAL, never a crash, healthy afterwards."""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import infer_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config

from protocol.finetune.v1 import classifier_pb2, classifier_pb2_grpc
from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
DATATYPES = ["BOOL", "UINT8", "INT8", "UINT16", "INT16", "FP16", "BF16", "UINT32", "INT32",
             "FP32", "UINT64", "INT64", "FP64", "BYTES"]  # fmt: skip
CONTENT_FIELDS = [f"{kind}_contents" for kind in ("bool", "int", "int64", "uint", "uint64",
                                                  "fp32", "fp64", "bytes")]  # fmt: skip
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = make_model_repository(tmp_path_factory.mktemp("bad-input") / "models")
    with RunningServer(server_config(repository, max_image_pixels=200_000)) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as opened:
        yield opened


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _content_values(field: str) -> st.SearchStrategy:
    values = {
        "bool_contents": st.booleans(),
        "int_contents": st.integers(-(2**31), 2**31 - 1),
        "int64_contents": st.integers(-(2**63), 2**63 - 1),
        "uint_contents": st.integers(0, 2**32 - 1),
        "uint64_contents": st.integers(0, 2**64 - 1),
        "fp32_contents": st.floats(width=32, allow_nan=True),
        "fp64_contents": st.floats(allow_nan=True),
        "bytes_contents": st.binary(max_size=8),
    }[field]
    return st.lists(values, max_size=64)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["classifier", "", "missing", "clas\x00sifier"])),
        model_version=draw(st.sampled_from(["", "1", "2", "-1", "01", "²", "abc"])),
        id=draw(st.text(max_size=8)),
    )
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        shape = draw(
            st.lists(st.integers(-2, 40) | st.sampled_from([2**31, 2**62]), min_size=0, max_size=5)
            | st.just([1, 32, 32, 3])
        )
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["image", "logits", "", "x"])),
            datatype=draw(st.sampled_from([*DATATYPES, "fp32", "STRING", ""])),
            shape=shape,
        )
        if use_raw:
            size = draw(st.sampled_from([0, 1, 3, 32 * 32 * 3, 2 * 32 * 32 * 3, 4 * 32 * 32 * 3]))
            request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
        else:
            field = draw(st.sampled_from(CONTENT_FIELDS))
            getattr(tensor.contents, field).extend(draw(_content_values(field)))
    if draw(st.booleans()):
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
    for name in draw(st.lists(st.sampled_from(["logits", "probabilities", "nope"]), max_size=2)):
        request.outputs.add(name=name)
    if draw(st.booleans()):
        request.parameters["timeout"].CopyFrom(
            draw(
                st.sampled_from(
                    [
                        pb.InferParameter(int64_param=-5),
                        pb.InferParameter(int64_param=10**12),
                        pb.InferParameter(string_param="soon"),
                        pb.InferParameter(bool_param=True),
                    ]
                )
            )
        )
    return request


@given(request=infer_requests())
@SETTINGS
def test_model_infer_never_fails_internally(
    channel: grpc.Channel, request: pb.ModelInferRequest
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert _code(lambda: stub.ModelInfer(request, timeout=10)) in ALLOWED


def _png(width: int, height: int, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


images = st.one_of(
    st.binary(max_size=256),
    st.builds(
        _png,
        st.integers(1, 600),
        st.integers(1, 600),
        st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"]),
    ),
    st.builds(lambda data, cut: data[:cut], st.just(_png(40, 40, "RGB")), st.integers(0, 120)),
)


@given(
    payload=st.lists(images, min_size=0, max_size=4),
    top_k=st.integers(0, 20),
    version=st.sampled_from(["", "1", "7", "x"]),
)
@SETTINGS
def test_classify_never_fails_internally(
    channel: grpc.Channel, payload: list[bytes], top_k: int, version: str
) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    request = classifier_pb2.ClassifyRequest(images=payload, top_k=top_k, model_version=version)
    assert _code(lambda: stub.Classify(request, timeout=10)) in ALLOWED


def test_still_healthy_after_the_battery(channel: grpc.Channel, server: RunningServer) -> None:
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    response = stub.ModelInfer(infer_request(np.zeros((1, 32, 32, 3), np.uint8)), timeout=10)
    assert response.model_version == "1"
    labels = {"model": "classifier", "version": "1", "outcome": "internal"}
    assert server.sample("inference_requests_total", labels) == 0
