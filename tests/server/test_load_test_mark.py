"""Load tests stay out of production metrics, and a bench stops when its server goes away.

``client bench`` marks its requests (``x-load-test: 1``); the server answers them but keeps
them out of the prediction monitors (class counts, confidence, abstentions, class drift) and
the capture, counting them in ``classification_load_test_predictions_total`` instead.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config

from client.api import AsyncInferenceClient, InferenceClient
from client.bench import bench_classify, synthetic_jpeg
from client.loadgen import LoadSpec, run_load
from client.stats import BenchReport
from contracts.load_test import LOAD_TEST_KEY, is_load_test

LABELS = {"model": "classifier", "version": "1"}
BATCH = 16  # the fixture's max_batch_size: images per Classify request
WINDOW = 1000  # the drift window: the gauge moves once this many answers were seen


def _repository(tmp_path: Path) -> Path:
    """Abstains on every image (each answer is a capture) and has a uniform val reference."""
    repo = make_model_repository(tmp_path / "models", num_classes=4)
    path = repo / "classifier" / "1" / "model.json"
    document = json.loads(path.read_text())
    document["abstention"] = {"threshold": 1.0, "target_precision": 0.95, "coverage": 0.0}
    document["val_class_counts"] = [25, 25, 25, 25]
    path.write_text(json.dumps(document))
    return repo


def _production(server: RunningServer) -> dict[str, float]:
    predictions = sum(
        server.sample("classification_predictions_total", {**LABELS, "label": f"class_{i}"})
        for i in range(4)
    )
    drift = server.registry.get_sample_value("classification_class_drift_psi", LABELS)
    return {
        "predictions": predictions,
        "top_probability_count": server.sample("classification_top_probability_count", LABELS),
        "abstentions": server.sample("classification_abstentions_total", LABELS),
        "drift": math.nan if drift is None else drift,
        "captured": server.sample("classification_captures_total", {"reason": "abstained"}),
        "load_test": server.sample("classification_load_test_predictions_total", LABELS),
    }


async def _bench(target: str, image: bytes) -> BenchReport:
    spec = LoadSpec(concurrency=4, duration_s=0.5, warmup_s=0.0, batch=BATCH)
    async with AsyncInferenceClient(target) as client:
        return await bench_classify(client, spec, image)


def test_a_bench_leaves_drift_abstentions_and_captures_alone(tmp_path: Path) -> None:
    captures = tmp_path / "captures"
    config = server_config(_repository(tmp_path), capture_dir=captures, capture_per_second=1e4)
    image = synthetic_jpeg(size=40)
    with RunningServer(config) as server:
        reports = []
        # Enough answers to fill the drift window: one image, one class, would be a huge PSI.
        while server.sample("classification_load_test_predictions_total", LABELS) < WINDOW:
            reports.append(asyncio.run(_bench(server.target, image)))
            assert len(reports) < 20, reports[-1].format_text()
        after_bench = _production(server)
        answered = server.sample("inference_requests_total", {**LABELS, "outcome": "success"})

        # The same images without the mark: this is what the bench used to do to the metrics.
        with InferenceClient(server.target) as client:
            for _ in range(math.ceil(WINDOW / BATCH)):
                client.classify_images([image] * BATCH)
        after_traffic = _production(server)
    written = list((captures / "unlabeled").rglob("*.jpg"))

    assert all(r.error_count == 0 and r.requests_ok > 0 for r in reports)
    assert after_bench["load_test"] == BATCH * answered >= WINDOW
    assert after_bench["predictions"] == after_bench["top_probability_count"] == 0
    assert after_bench["abstentions"] == after_bench["captured"] == 0
    assert math.isnan(after_bench["drift"])

    assert after_traffic["load_test"] == after_bench["load_test"]
    assert after_traffic["predictions"] == after_traffic["abstentions"] >= WINDOW
    assert after_traffic["drift"] > 1.0  # one class against a uniform reference
    # Every capture written came from the unmarked requests (the server stopped: all written).
    assert server.sample("classification_captures_total", {"reason": "abstained"}) == len(written)
    assert written


def test_the_mark_is_read_from_metadata() -> None:
    assert is_load_test([(LOAD_TEST_KEY, "1")])
    assert is_load_test([("authorization", "Bearer x"), ("X-Load-Test", "true")])
    assert is_load_test([(LOAD_TEST_KEY, b"yes")])
    assert not is_load_test([(LOAD_TEST_KEY, "0")])
    assert not is_load_test([(LOAD_TEST_KEY, "")])
    assert not is_load_test([("x-load", "1")])
    assert not is_load_test(None)


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="failed to connect to all addresses\nsecond line",
    )


@pytest.mark.parametrize("rate", [None, 2000.0])
def test_the_load_stops_at_a_burst_of_unavailable(rate: float | None) -> None:
    calls = {"ok": 0, "failed": 0}
    gone_at = time.perf_counter() + 0.2

    async def call() -> None:
        if time.perf_counter() >= gone_at:
            calls["failed"] += 1
            raise _unavailable()
        await asyncio.sleep(0.005)
        calls["ok"] += 1

    spec = LoadSpec(concurrency=4, rate=rate, duration_s=20.0, warmup_s=0.0)
    started = time.perf_counter()
    report = asyncio.run(run_load(call, spec, target="t"))
    assert time.perf_counter() - started < 5.0
    assert calls["ok"] > 0 and calls["failed"] <= 20 + 4
    assert report.stopped is not None
    assert report.stopped.startswith("20 requests in a row failed UNAVAILABLE")
    assert report.stopped.endswith(": failed to connect to all addresses")
    assert report.duration_s < 1.0 and report.requests_ok == calls["ok"]
    assert f"stopped     early: {report.stopped}" in report.format_text()
    assert json.loads(json.dumps(report.to_dict()))["stopped"] == report.stopped


def test_late_answers_to_requests_sent_before_the_outage_do_not_restart_the_count() -> None:
    # Three slow requests sent before the server went away answer while the fourth worker
    # fails every 2 ms: each answer is stale news and must not reset the burst (it did, and a
    # slow CI host turned the 20-failure stop into 35).
    sent = 0
    failed = 0

    async def call() -> None:
        nonlocal sent, failed
        sent += 1
        if sent <= 3:
            await asyncio.sleep(0.012 * sent)
            return
        await asyncio.sleep(0.002)
        failed += 1
        raise _unavailable()

    spec = LoadSpec(concurrency=4, duration_s=20.0, warmup_s=0.0)
    report = asyncio.run(run_load(call, spec, target="t"))
    assert report.stopped is not None and report.stopped.startswith("20 requests in a row")
    # The 20th failure stops the run; at most the other three workers' calls already in flight
    # fail after it.
    assert 20 <= failed <= 20 + 3


def test_other_failures_between_unavailable_ones_do_not_stop_the_load() -> None:
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.001)
        if calls % 10:  # nine UNAVAILABLE, then an answer: the server is still there
            raise _unavailable()

    report = asyncio.run(run_load(call, LoadSpec(duration_s=0.3, warmup_s=0.0), target="t"))
    assert report.stopped is None and report.requests_ok > 0


def test_bench_against_a_server_that_stops_ends_with_one_summary_line(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    server = RunningServer(server_config(repo))
    command = [
        sys.executable, "-m", "client.cli", "bench", "--target", server.target,
        "--duration-s", "60", "--warmup-s", "0", "--concurrency", "4",
    ]  # fmt: skip
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        success = {**LABELS, "outcome": "success"}
        while server.sample("inference_requests_total", success) < 20:
            assert time.monotonic() < deadline and bench.poll() is None, "bench never ran"
            time.sleep(0.05)
    finally:
        server.stop()
    stopped = time.monotonic()
    out, err = bench.communicate(timeout=30)
    assert time.monotonic() - stopped < 10
    assert bench.returncode == 1
    # gRPC's own library may add a line of its own (a GOAWAY, at its default verbosity).
    assert len(err.splitlines()) <= 3, err
    (line,) = [line for line in err.splitlines() if line.startswith("client bench:")]
    assert line.startswith("client bench: stopped early: ") and "UNAVAILABLE" in line
    assert len(out.splitlines()) <= 8
    assert "UNAVAILABLE" in out and "stopped     early" in out
