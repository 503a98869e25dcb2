"""The ModelInfer request validator: named limits instead of INTERNAL, names cut short in
errors, the input byte budget, and Hypothesis over random shapes, datatypes and contents
(in process, and through a real server): never INTERNAL, nothing converted before the
checks, bounded time per request."""

from __future__ import annotations

import math
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import RunningServer, server_config
from wire_messages import (
    MODEL_INFER,
    WIRE_FIXED32,
    WIRE_FIXED64,
    WIRE_VARINT,
    call_raw,
    field,
    infer_request,
    input_tensor,
    tag,
    unlimited_channel,
)

from contracts.oip_datatypes import DATATYPES
from server.errors import MessageTooLarge, Overloaded, ServerError
from server.handlers.byte_budget import ByteBudget
from server.handlers.inference import check_staged_inputs
from server.onnx_sessions import TensorSpec
from server.transport.converters import stage_infer_request
from server.transport.wire import MAX_RANK, parse_staged_infer_request

INVALID = grpc.StatusCode.INVALID_ARGUMENT
IMAGE = TensorSpec("image", "UINT8", (-1, 32, 32, 3), np.dtype(np.uint8))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from repository_factory import make_model_repository

    repository = make_model_repository(tmp_path_factory.mktemp("validation") / "models")
    with RunningServer(server_config(repository, warmup_batch_sizes=(1,))) as running:
        yield running


def _error(server: RunningServer, body: bytes) -> grpc.RpcError:
    with unlimited_channel(server.target) as channel:
        error = call_raw(channel, MODEL_INFER, body, timeout=60).exception()
    assert error is not None, "the request was answered"
    return error


def test_more_than_eight_dimensions_name_the_limit(server: RunningServer) -> None:
    for rank, contents in ((65, None), (9, b"")):  # raw contents, then typed
        tensor = input_tensor("image", "UINT8", [1] * rank, contents)
        raw = [b"\x00"] if contents is None else []
        error = _error(server, infer_request("classifier", [tensor], raw=raw))
        assert error.code() is INVALID
        assert f"shape has {rank} dimensions; at most {MAX_RANK} are accepted" in error.details()


def test_names_in_errors_are_cut_short(server: RunningServer) -> None:
    huge = "m" * (16 << 20)
    error = _error(server, infer_request(huge, [input_tensor(shape=[1, 32, 32, 3])]))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert f"({16 << 20} characters)" in error.details()
    assert len(error.details()) < 300
    long_input = "x" * 100_000
    body = infer_request("classifier", [input_tensor(long_input, "UINT8", [1])], raw=[b"\x00"])
    error = _error(server, body)
    assert error.code() is INVALID
    assert "(100000 characters)" in error.details()
    assert len(error.details()) < 600


def test_inputs_over_the_byte_budget_are_refused_before_converting(
    model_repository: Path,
) -> None:
    config = server_config(model_repository, max_inflight_input_bytes=1000)
    images = np.zeros((1, 32, 32, 3), np.uint8)  # 3072 bytes
    body = infer_request("classifier", [input_tensor(shape=images.shape)], raw=[images.tobytes()])
    with RunningServer(config) as server:
        error = _error(server, body)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_inflight_input_bytes" in error.details()


def test_byte_budget_refuses_what_does_not_fit_beside_what_is_held() -> None:
    budget = ByteBudget(100)
    with budget.reserve(60):
        with pytest.raises(Overloaded, match="60 of 100 bytes"), budget.reserve(41):
            pass
        with budget.reserve(40):
            assert budget.reserved == 100
    assert budget.reserved == 0
    with pytest.raises(MessageTooLarge, match="max_inflight_input_bytes"), budget.reserve(101):
        pass


# Hypothesis: request bytes built on the wire, so that every shape, datatype and contents
# size is possible, including the ones protobuf's own builders would refuse.
DIMENSIONS = st.one_of(
    st.integers(-3, 64), st.sampled_from([-(2**63), 2**31, 2**40, 2**63 - 1]), st.just(32)
)
DATATYPE_NAMES = st.one_of(st.sampled_from(sorted(DATATYPES)), st.text(max_size=12))
# InferTensorContents fields 1-8 and how each travels unpacked.
FIELD_WIRE_TYPES = {1: WIRE_VARINT, 2: WIRE_VARINT, 3: WIRE_VARINT, 4: WIRE_VARINT}
FIELD_WIRE_TYPES |= {5: WIRE_VARINT, 6: WIRE_FIXED32, 7: WIRE_FIXED64, 8: 2}


def _unpacked(number: int, count: int) -> bytes:
    wire_type = FIELD_WIRE_TYPES.get(number, WIRE_VARINT)
    if wire_type == 2:
        return (tag(number, 2) + b"\x01a") * count
    value = {WIRE_FIXED32: b"\x00" * 4, WIRE_FIXED64: b"\x00" * 8}.get(wire_type, b"\x01")
    return (tag(number, wire_type) + value) * count


def _packed(number: int, count: int) -> bytes:
    wire_type = FIELD_WIRE_TYPES.get(number, WIRE_VARINT)
    if wire_type == 2:
        return _unpacked(number, count)  # bytes are never packed
    size = {WIRE_FIXED32: 4, WIRE_FIXED64: 8}.get(wire_type, 1)
    return field(number, b"\x00" * (size * count) if size > 1 else b"\x01" * count)


@st.composite
def typed_contents(draw: st.DrawFn, expected: int) -> bytes:
    """InferTensorContents: a few fields, packed or not, often of the expected count."""
    counts = st.sampled_from([expected] * 6 + [0, 1, expected + 1, 5000])
    parts = []
    for number in draw(st.lists(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 4, 4]), max_size=3)):
        encode = _packed if draw(st.booleans()) else _unpacked
        parts.append(encode(number, draw(counts)))
    return b"".join(parts)


@st.composite
def shapes(draw: st.DrawFn) -> list[int]:
    if draw(st.integers(0, 3)) > 0:  # the model's own shape, perhaps with one dimension changed
        shape = [draw(st.integers(0, 20)), 32, 32, 3]
        if draw(st.integers(0, 3)) == 0:
            shape[draw(st.integers(0, 3))] = draw(DIMENSIONS)
        return shape
    return draw(st.lists(DIMENSIONS, max_size=10))


@st.composite
def infer_requests(draw: st.DrawFn) -> bytes:
    """ModelInferRequest bytes: often close to what the model takes, sometimes anything."""
    inputs, raw = [], []
    use_raw = draw(st.booleans())
    for _ in range(draw(st.sampled_from([1] * 6 + [0, 2, 3]))):
        name = draw(st.sampled_from(["image"] * 5 + ["other", ""]))
        datatype = draw(st.sampled_from(["UINT8"] * 8 + ["other"]))
        if datatype == "other":
            datatype = draw(DATATYPE_NAMES)
        shape = draw(shapes())
        dimensions = [d for d in shape if d > 0]
        # math.prod: exact; numpy's int64 product wraps to a huge negative count that
        # passes the bound below and then cannot size a bytes object.
        count = math.prod(dimensions) if len(dimensions) == len(shape) else 0
        count = count if count <= 20 * 32 * 32 * 3 else 0
        contents = None if use_raw else draw(typed_contents(count))
        inputs.append(input_tensor(name, datatype, shape, contents))
        if use_raw:
            itemsize = DATATYPES[datatype].itemsize if datatype in DATATYPES else 1
            size = draw(st.sampled_from([count * itemsize] * 4 + [0, 7, 3072]))
            raw.append(b"\x00" * size)
    body = infer_request(
        draw(st.sampled_from(["classifier", "classifier", "missing"])), inputs, raw
    )
    if draw(st.integers(0, 9)) == 0:  # damaged: cut short, or stray bytes
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=8))
    return body


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(infer_requests())
def test_the_validator_refuses_with_domain_errors_and_converts_last(body: bytes) -> None:
    tracemalloc.start()
    try:
        staged = stage_infer_request(parse_staged_infer_request(body))
        check_staged_inputs([IMAGE], 16, staged.inputs)
        _, checked_peak = tracemalloc.get_traced_memory()
    except ServerError:
        return
    finally:
        tracemalloc.stop()
    # Nothing was converted before the checks passed: no array of the request's size.
    assert checked_peak <= 64 * 1024 + 2 * len(body)
    for tensor in staged.inputs:
        try:
            array = tensor.convert()
        except ServerError:
            continue
        assert array.shape == tensor.shape
        assert array.nbytes <= tensor.cost_bytes or tensor.datatype == "BYTES"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=infer_requests())
def test_a_real_server_never_answers_internal(server: RunningServer, body: bytes) -> None:
    started = time.monotonic()
    with unlimited_channel(server.target) as channel:
        error = call_raw(channel, MODEL_INFER, body, timeout=30).exception()
    assert time.monotonic() - started < 5.0
    if error is not None:
        assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            error.details()
        )
