"""Protobuf <-> numpy: raw and typed contents, BYTES, and the checks on them."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.inference import grpc_service_pb2 as pb
from server.errors import InvalidInput
from server.handlers.staged_request import StagedInferRequest
from server.transport.converters import (
    deserialize_bytes,
    infer_response_to_proto,
    serialize_bytes,
    stage_infer_request,
)
from server.transport.wire import parse_staged_infer_request
from server.types import InferResponse, Tensor


def _staged(message: pb.ModelInferRequest) -> StagedInferRequest:
    """The message as the server receives it: parsed staged, checked, nothing converted."""
    return stage_infer_request(parse_staged_infer_request(message.SerializeToString()))


def _arrays(message: pb.ModelInferRequest) -> list[np.ndarray]:
    return [tensor.convert() for tensor in _staged(message).inputs]


def test_bytes_round_trip() -> None:
    values = np.array([b"", b"a", b"\x00\xff" * 3, "caf\u00e9".encode()], dtype=np.object_)
    raw = serialize_bytes(values)
    assert raw[:4] == b"\x00\x00\x00\x00"
    assert list(deserialize_bytes(raw, 4, "x")) == list(values)
    with pytest.raises(InvalidInput, match="longer than the data"):
        deserialize_bytes(raw[:-1], 4, "x")
    with pytest.raises(InvalidInput, match="3 BYTES elements"):
        deserialize_bytes(serialize_bytes(values[:3]), 4, "x")


def test_raw_and_typed_requests_decode_the_same() -> None:
    data = np.arange(12, dtype=np.int32).reshape(2, 6) - 5
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="x", datatype="INT32", shape=[2, 6])
    raw.raw_input_contents.append(data.tobytes())
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="INT32", shape=[2, 6]).contents.int_contents.extend(
        data.reshape(-1).tolist()
    )
    for message in (raw, typed):
        [array] = _arrays(message)
        np.testing.assert_array_equal(array, data)
        assert array.dtype == np.int32


def test_bytes_input_raw_and_typed() -> None:
    values = [b"one", b"", b"three"]
    raw = pb.ModelInferRequest()
    raw.inputs.add(name="s", datatype="BYTES", shape=[3])
    raw.raw_input_contents.append(serialize_bytes(np.array(values, dtype=np.object_)))
    typed = pb.ModelInferRequest()
    typed.inputs.add(name="s", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(values)
    for message in (raw, typed):
        assert list(_arrays(message)[0]) == values


@pytest.mark.parametrize(
    ("datatype", "shape", "payload", "message"),
    [
        ("FP32", [2], b"\x00" * 7, "needs 8"),
        ("FP32", [-1], b"", "negative"),
        ("COMPLEX", [1], b"\x00", "unknown datatype"),
        ("UINT8", [2**40, 2**40], b"", "too large"),
        ("UINT8", [0, 2**40, 2**40], b"", "too large"),
    ],
)
def test_raw_checks(datatype: str, shape: list[int], payload: bytes, message: str) -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(payload)
    with pytest.raises(InvalidInput, match=message):
        _arrays(request)


def test_typed_checks() -> None:
    wrong_field = pb.ModelInferRequest()
    wrong_field.inputs.add(name="x", datatype="FP32", shape=[1]).contents.int_contents.append(1)
    with pytest.raises(InvalidInput, match="int_contents set for a FP32"):
        _arrays(wrong_field)
    out_of_range = pb.ModelInferRequest()
    out_of_range.inputs.add(name="x", datatype="UINT8", shape=[1]).contents.uint_contents.append(
        300
    )
    with pytest.raises(InvalidInput, match="out of range"):
        _arrays(out_of_range)
    half = pb.ModelInferRequest()
    half.inputs.add(name="x", datatype="FP16", shape=[0])
    with pytest.raises(InvalidInput, match="only be sent as raw"):
        _staged(half)


def test_response_raw_or_typed() -> None:
    response = InferResponse(
        "m", "1", "id", [Tensor("y", "FP32", np.array([[0.5, 1.5]], dtype=np.float32))]
    )
    raw = infer_response_to_proto(response, raw=True)
    assert np.frombuffer(raw.raw_output_contents[0], "<f4").tolist() == [0.5, 1.5]
    typed = infer_response_to_proto(response, raw=False)
    assert list(typed.outputs[0].contents.fp32_contents) == [0.5, 1.5]
    assert list(typed.outputs[0].shape) == [1, 2]


def _request_with_outputs(*outputs: tuple[str, int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[2])
    request.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    for name, class_count in outputs:
        output = request.outputs.add(name=name)
        if class_count:
            output.parameters["classification"].int64_param = class_count
    return request


def test_requested_outputs_and_class_counts() -> None:
    plain = _staged(_request_with_outputs(("a", 0), ("b", 3)))
    assert plain.requested_outputs == ["a", "b"]
    assert plain.class_counts == {"b": 3}
    with pytest.raises(InvalidInput, match=r"outputs\[1\] \('a'\): output requested more"):
        _staged(_request_with_outputs(("a", 0), ("a", 0)))
    with pytest.raises(InvalidInput, match="must be a positive integer"):
        _staged(_request_with_outputs(("a", -2)))


def test_outputs_are_checked_before_inputs_are_converted() -> None:
    request = _request_with_outputs(("a", 0), ("a", 0))
    request.raw_input_contents[0] = b"short"
    with pytest.raises(InvalidInput, match="requested more than once"):
        _staged(request)


@pytest.mark.parametrize(
    ("datatype", "field", "values", "expected"),
    [
        ("INT8", "int_contents", [-128, 127], np.array([-128, 127], np.int8)),
        ("UINT16", "uint_contents", [0, 65535], np.array([0, 65535], np.uint16)),
        ("UINT64", "uint64_contents", [0, 2**64 - 1], np.array([0, 2**64 - 1], np.uint64)),
        ("INT64", "int64_contents", [-(2**63), 5], np.array([-(2**63), 5], np.int64)),
        ("FP32", "fp32_contents", [0.5, -1.0], np.array([0.5, -1.0], np.float32)),
        ("BOOL", "bool_contents", [True, False], np.array([True, False])),
    ],
)
def test_typed_contents_convert_exactly(
    datatype: str, field: str, values: list, expected: np.ndarray
) -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2])
    getattr(tensor.contents, field).extend(values)
    [array] = _arrays(request)
    assert array.dtype == expected.dtype
    np.testing.assert_array_equal(array, expected)
