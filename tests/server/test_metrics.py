"""/metrics parses with prometheus_client's parser and counts what the test sent."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_helpers import infer_request
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from server_harness import RunningServer, server_config

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc
from server.metrics import METRICS, ServerMetrics


def _scrape(server: RunningServer) -> dict[tuple[str, tuple], float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_what_was_sent(model_repository: Path) -> None:
    with RunningServer(server_config(model_repository, metrics_port=0)) as server:
        _check_metrics(server)


def _check_metrics(running_server: RunningServer) -> None:
    sent, invalid = 5, 2
    with grpc.insecure_channel(running_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for i in range(sent):
            stub.ModelInfer(infer_request(np.full((2, 32, 32, 3), i, np.uint8)), timeout=10)
        for _ in range(invalid):
            bad = pb.ModelInferRequest(model_name="classifier")
            bad.inputs.add(name="image", datatype="FP32", shape=[1, 32, 32, 3])
            bad.raw_input_contents.append(bytes(4 * 32 * 32 * 3))
            try:
                stub.ModelInfer(bad, timeout=10)
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    samples = _scrape(running_server)
    model = (("model", "classifier"), ("version", "1"))

    def value(name: str, *labels: tuple[str, str]) -> float:
        return samples.get((name, tuple(sorted(model + labels))), 0.0)

    assert value("inference_requests_total", ("outcome", "success")) == sent
    assert value("inference_requests_total", ("outcome", "invalid")) == invalid
    assert value("inference_request_duration_seconds_count") == sent
    assert value("inference_queue_duration_seconds_count") == sent
    assert value("inference_batch_size_sum") == 2 * sent
    assert value("inference_compute_duration_seconds_count") == value("inference_batch_size_count")
    assert value("inference_rows_total") == 2 * sent
    grpc_labels = (
        ("grpc_method", "ModelInfer"),
        ("grpc_service", "inference.GRPCInferenceService"),
        ("grpc_type", "unary"),
    )
    ok = samples[("grpc_server_handled_total", tuple(sorted((*grpc_labels, ("grpc_code", "OK")))))]
    rejected = samples[
        (
            "grpc_server_handled_total",
            tuple(sorted((*grpc_labels, ("grpc_code", "INVALID_ARGUMENT")))),
        )
    ]
    assert (ok, rejected) == (sent, invalid)
    assert samples[("grpc_server_started_total", tuple(sorted(grpc_labels)))] == sent + invalid
    assert (
        samples[("grpc_server_handling_seconds_count", tuple(sorted(grpc_labels)))]
        == sent + invalid
    )
    assert samples[("model_loads_total", (("model", "classifier"),))] == 1
    assert (
        "model_info",
        tuple(sorted((*model, ("provider", "CPUExecutionProvider"), ("precision", "fp32")))),
    ) in samples


def test_unknown_model_names_do_not_become_labels(running_server: RunningServer) -> None:
    with grpc.insecure_channel(running_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name in ("a", "b", "c"):
            request = infer_request(np.zeros((1, 32, 32, 3), np.uint8), model=name)
            try:
                stub.ModelInfer(request, timeout=10)
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.NOT_FOUND
    labels = {"model": "", "version": "", "outcome": "not_found"}
    assert running_server.sample("inference_requests_total", labels) == 3
    assert (
        running_server.registry.get_sample_value(
            "inference_requests_total", {"model": "a", "version": "", "outcome": "not_found"}
        )
        is None
    )


def test_metrics_port_serves_metrics_only_with_process_metrics(model_repository: Path) -> None:
    config = server_config(model_repository, metrics_port=0, metrics_host="127.0.0.1")
    with RunningServer(config) as server:
        names = {name for name, _ in _scrape(server)}
        assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= names
        for path in ("/", "/metricsx", "/favicon.ico", "/metrics/../x"):
            url = f"http://127.0.0.1:{server.metrics_port}{path}"
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(url, timeout=5)
            assert error.value.code == 404


def test_metrics_connection_idle_past_the_timeout_is_closed(model_repository: Path) -> None:
    config = server_config(model_repository, metrics_port=0, metrics_timeout_s=0.2)
    with (
        RunningServer(config) as server,
        socket.create_connection(("127.0.0.1", server.metrics_port), timeout=60) as sock,
    ):
        # Send nothing: the server closes the connection after metrics_timeout_s; the 60 s
        # client timeout only keeps a failing test from hanging.
        assert sock.recv(1024) == b""


def test_a_trickling_client_is_cut_off_at_the_whole_request_deadline(
    model_repository: Path,
) -> None:
    config = server_config(model_repository, metrics_port=0, metrics_timeout_s=1.0)
    with (
        RunningServer(config) as server,
        socket.create_connection(("127.0.0.1", server.metrics_port), timeout=60) as sock,
    ):
        # One byte every 0.2 s never lets a per-read timeout of 1 s expire; the deadline does.
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X" * 1000:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
        elapsed = time.monotonic() - started
        assert elapsed < 30, elapsed  # closed by the deadline, not after 200 s of trickling
        assert sock.recv(1024) == b""


def test_connections_beyond_the_cap_are_closed_and_scrapes_resume(
    model_repository: Path,
) -> None:
    from server.metrics_http import MAX_CONNECTIONS

    config = server_config(model_repository, metrics_port=0, metrics_timeout_s=20.0)
    with RunningServer(config) as server:
        address = ("127.0.0.1", server.metrics_port)
        idle = [socket.create_connection(address, timeout=60) for _ in range(MAX_CONNECTIONS)]
        try:
            # Once the server has taken the idle ones (a busy machine may take a moment), a
            # further connection is closed at once instead of waiting out the 20 s deadline.
            deadline = time.monotonic() + 15
            while True:
                with socket.create_connection(address, timeout=60) as extra:
                    extra.settimeout(1.0)
                    try:
                        if extra.recv(1024) == b"":
                            break
                    except TimeoutError:
                        pass  # it got a slot: the server had not taken them all yet
                assert time.monotonic() < deadline, "the cap never closed a connection"
        finally:
            for sock in idle:
                sock.close()
        # The idle slots free up as their clients leave: a scrape works again.
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _scrape(server)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.1)


def test_every_metric_of_the_table_has_its_typed_attribute() -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    declared = set(ServerMetrics.__annotations__)
    assert declared == {spec.attribute for spec in METRICS}
    assert len({spec.name for spec in METRICS}) == len(METRICS)
    for spec in METRICS:
        metric = getattr(metrics, spec.attribute)
        assert isinstance(metric, spec.kind)
        assert spec.kind.__name__ == ServerMetrics.__annotations__[spec.attribute]
