"""The HTTP/REST converters without a server: whatever a client sends becomes a staged request
whose inputs convert, or InvalidInput / MessageTooLarge (never another exception, so never a
500), and answers read back through tritonclient's own parser."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import tritonclient.http as triton_http
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.errors import InvalidInput, MessageTooLarge
from server.transport.http_converters import (
    MAX_JSON_BYTES,
    OutputEncoding,
    infer_request_from_http,
    infer_response_to_http,
    parse_json,
)
from server.types import InferResponse, Tensor

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["name", "datatype", "shape", "data", "parameters", "binary_data_size", "classification"]
)
DATATYPES = st.sampled_from(["UINT8", "INT64", "FP32", "FP16", "BF16", "BOOL", "BYTES", "X"])
TENSORS = st.fixed_dictionaries(
    {
        "name": st.text(max_size=4) | SCALARS,
        "datatype": DATATYPES | SCALARS,
        "shape": st.lists(st.integers(-2, 4), max_size=3) | JSON_VALUES,
    },
    optional={
        "data": st.lists(SCALARS | st.lists(SCALARS, max_size=3), max_size=12) | JSON_VALUES,
        "parameters": st.dictionaries(FIELDS, JSON_VALUES),
    },
)
DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(TENSORS, max_size=3) | JSON_VALUES,
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.text(max_size=4) | SCALARS},
                optional={"parameters": st.dictionaries(FIELDS, JSON_VALUES)},
            ),
            max_size=3,
        )
        | JSON_VALUES,
        "id": st.text(max_size=4) | SCALARS,
        "parameters": st.dictionaries(st.text(max_size=8), JSON_VALUES) | JSON_VALUES,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=DOCUMENTS, tail=st.binary(max_size=16), split=st.booleans())
def test_any_json_is_a_request_or_a_client_error(document: dict, tail: bytes, split: bool) -> None:
    header = json.dumps(document).encode()
    try:
        request, _ = infer_request_from_http(
            header + tail if split else header, str(len(header)) if split else None, "m", ""
        )
        arrays = [tensor.convert() for tensor in request.inputs]
    except (InvalidInput, MessageTooLarge):
        return
    for tensor, array, sent in zip(request.inputs, arrays, document["inputs"], strict=True):
        assert (tensor.name, tensor.datatype) == (sent["name"], sent["datatype"])
        assert tensor.shape == array.shape == tuple(sent["shape"])
        assert tensor.cost_bytes >= array.nbytes


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=64), header_length=st.none() | st.text(max_size=4))
@example(body=b"", header_length="0\x1f")  # str.strip() took the control character
def test_any_bytes_are_a_request_or_a_client_error(body: bytes, header_length: str | None) -> None:
    with contextlib.suppress(InvalidInput, MessageTooLarge):
        request, _ = infer_request_from_http(body, header_length, "m", "")
        for tensor in request.inputs:
            tensor.convert()


def test_nested_and_flat_json_data_give_the_same_tensor() -> None:
    values = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    requests = [
        json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2, 3], "data": data}]}
        ).encode()
        for data in (values.reshape(-1).tolist(), values.tolist())
    ]
    for body in requests:
        request, _ = infer_request_from_http(body, None, "m", "")
        np.testing.assert_array_equal(request.inputs[0].convert(), values)


def test_binary_and_json_inputs_mix_in_one_request() -> None:
    words = np.array([b"ab", b"", b"\xff"], dtype=np.object_)
    raw = b"".join(len(w).to_bytes(4, "little") + w for w in words)
    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "datatype": "INT16", "shape": [2], "data": [-3, 7]},
                {
                    "name": "b",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(raw)},
                },
                {"name": "c", "datatype": "BOOL", "shape": [1], "data": [True]},
            ],
            "parameters": {"timeout": 5_000_000},
        }
    ).encode()
    request, encoding = infer_request_from_http(header + raw, str(len(header)), "m", "2", 10.0)
    assert [t.name for t in request.inputs] == ["a", "b", "c"]
    a, b, c = (tensor.convert() for tensor in request.inputs)
    np.testing.assert_array_equal(a, np.array([-3, 7], np.int16))
    assert list(b) == list(words)
    assert c.tolist() == [True]
    assert (request.model_name, request.model_version, request.deadline) == ("m", "2", 15.0)
    assert encoding == OutputEncoding()


def test_the_json_part_is_capped() -> None:
    with pytest.raises(MessageTooLarge, match="binary_data_size"):
        parse_json(b" " * (MAX_JSON_BYTES + 1))


@pytest.mark.parametrize("binary", [True, False])
def test_answers_read_back_with_tritonclients_parser(binary: bool) -> None:
    outputs = [
        Tensor("p", "FP32", np.array([[0.25, 0.75]], np.float32)),
        Tensor("k", "BYTES", np.array([[b"0.75:1:cat"]], dtype=np.object_)),
        Tensor("raw", "BYTES", np.array([b"\xff\xfe"], dtype=np.object_)),  # not UTF-8
    ]
    body, header_length = infer_response_to_http(
        InferResponse("m", "1", "id-9", outputs), OutputEncoding(binary_default=binary)
    )
    assert header_length is not None  # "raw" cannot travel as JSON
    result = triton_http.InferenceServerClient.parse_response_body(
        body, header_length=header_length
    )
    np.testing.assert_array_equal(result.as_numpy("p"), outputs[0].data)
    label = result.as_numpy("k")[0, 0]
    assert (label if isinstance(label, bytes) else label.encode()) == b"0.75:1:cat"
    assert result.as_numpy("raw").tolist() == [b"\xff\xfe"]
    assert result.get_response()["id"] == "id-9"
