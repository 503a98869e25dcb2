"""Pure parts of the client: percentiles, reports, tensor encoding, the load generator's loop."""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.loadgen import LoadSpec, run_load, status_name
from client.stats import BenchReport, LatencySummary, percentile
from client.tensors import TensorError, decode, encode


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=50),
    st.floats(0, 100),
)
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    ordered = sorted(values)
    assert percentile(ordered, q) == pytest.approx(np.percentile(ordered, q), rel=1e-9, abs=1e-9)


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def test_report_of_a_run_without_successes_is_valid_json() -> None:
    report = BenchReport(
        target="h:1",
        mode="concurrency",
        concurrency=2,
        rate=None,
        batch=4,
        duration_s=2.0,
        requests_ok=0,
        errors={"UNAVAILABLE": 3},
        latency=LatencySummary.from_seconds([]),
    )
    document = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert document["latency"]["p99_ms"] is None
    assert document["error_count"] == 3 and document["images_per_s"] == 0
    assert "UNAVAILABLE 3" in report.format_text()

    summary = LatencySummary.from_seconds([0.001, 0.002, 0.003, 0.004])
    assert summary.p50_ms == pytest.approx(2.5) and summary.max_ms == pytest.approx(4.0)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.uint8).reshape(3, 4),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        np.array([[True, False]]),
        np.arange(4, dtype=np.int64).astype(">i8"),  # big-endian input goes out little-endian
        np.array([b"ab", b"", "\u00e9".encode()], dtype=object),
    ],
)
def test_tensor_round_trip(array: np.ndarray) -> None:
    datatype, raw = encode(array)
    back = decode(datatype, array.shape, raw)
    assert back.shape == array.shape
    assert back.tolist() == array.tolist()


def test_tensor_decode_rejects_wrong_sizes() -> None:
    with pytest.raises(TensorError, match="needs 8 bytes"):
        decode("FP32", [2], b"\x00" * 7)
    with pytest.raises(TensorError, match="BYTES element longer than the data"):
        decode("BYTES", [1], b"\x05\x00\x00\x00ab")
    with pytest.raises(TensorError, match="unsupported datatype"):
        decode("COMPLEX", [1], b"")
    with pytest.raises(TensorError, match="no Open Inference Protocol datatype"):
        encode(np.zeros(2, dtype=np.complex64))


def test_closed_and_open_loop_counting() -> None:
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls % 4 == 0:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="queue full",
            )

    closed = asyncio.run(
        run_load(call, LoadSpec(concurrency=4, duration_s=0.4, warmup_s=0.05), target="t")
    )
    # 4 workers x >= 10 ms per call over 0.4 s: at most about 160 calls (fewer on a busy
    # machine, so only the upper bound is a number), every fourth one failed.
    total = closed.requests_ok + closed.error_count
    assert 4 <= total <= 170
    assert set(closed.errors) == {"RESOURCE_EXHAUSTED"}
    assert abs(4 * closed.errors["RESOURCE_EXHAUSTED"] - total) <= 4 + 4
    assert closed.latency.p50_ms >= 10.0

    opened = asyncio.run(
        run_load(call, LoadSpec(concurrency=8, rate=100, duration_s=0.4, warmup_s=0), target="t")
    )
    assert opened.mode == "rate"
    # 100/s for 0.4 s: never more than 41; a busy machine may start fewer.
    assert 4 <= opened.requests_ok + opened.error_count <= 41
    assert status_name(ValueError()) == "ValueError"
