"""Progress into a Kubeflow TrainJob's status, against a real local HTTPS endpoint.

The endpoint is an ``http.server`` on 127.0.0.1:0 behind TLS with a certificate made here by
``openssl``; it answers 403 unless the bearer token is the one now in the token file, as the
Trainer's status server does with its rotating projected token. A down or slow endpoint must
cost the training loop nothing: the hook is timed.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import tiny_config

from trainer.finetune.phase_runner import RunObservers
from trainer.job.stopping import StopRequest
from trainer.job.telemetry import TrainingTelemetry
from trainer.job.trainjob_progress import (
    CA_CERT_ENV,
    MAX_METRIC_CHARS,
    TOKEN_ENV,
    URL_ENV,
    StatusEndpoint,
    TrainJobProgress,
    trainjob_progress_from_env,
)

STATUS_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ns/trainjobs/job/status"
PLAN = [("head", 2), ("finetune", 8)]
# What the training loop may spend in the hook, per call. A hook that waited on the slow
# endpoint would spend at least its request's timeout (0.2 s); a loaded two-core host can
# stall any call for tens of milliseconds: the budget sits between the two.
HOOK_BUDGET_S = 0.1


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (IP SAN), and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


@dataclass
class StatusServer:
    """The Trainer's status endpoint as the trainer sees it."""

    url: str
    ca_file: Path
    token_file: Path
    received: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0
    delay_s: float = 0.0
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def endpoint(self) -> StatusEndpoint:
        return StatusEndpoint(self.url, self.ca_file, self.token_file)

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= count, timeout_s), (
                f"{len(self.received)} of {count} updates arrived"
            )
            return list(self.received)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (the slow-endpoint test) closes mid-answer: not an error here."""


@pytest.fixture
def status_server(tmp_path: Path) -> Iterator[StatusServer]:
    cert, key = make_certificate(tmp_path / "tls")
    token_file = tmp_path / "token"
    token_file.write_text("token-1\n")
    state: dict[str, StatusServer] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            server = state["server"]
            time.sleep(server.delay_s)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            expected = f"Bearer {server.token_file.read_text().strip()}"
            if self.path != STATUS_PATH or self.headers["Authorization"] != expected:
                server.refused += 1
                self._answer(403, {"kind": "Status", "reason": "Forbidden"})
                return
            assert self.headers["Content-Type"] == "application/json"
            with server.arrived:
                server.received.append(json.loads(body))
                server.arrived.notify_all()
            self._answer(200, json.loads(body))

        def _answer(self, code: int, document: dict[str, Any]) -> None:
            data = json.dumps(document).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    port = httpd.server_address[1]
    state["server"] = StatusServer(f"https://127.0.0.1:{port}{STATUS_PATH}", cert, token_file)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state["server"]
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_epoch_ends(hook: Any, count: int) -> float:
    """The slowest of ``count`` epoch-end calls of ``hook`` (a reporter or RunObservers)."""
    slowest = 0.0
    for epoch in range(1, count + 1):
        started = time.perf_counter()
        if isinstance(hook, RunObservers):
            hook.epoch_end(
                {"phase": "finetune", "epoch": epoch, "train_loss": 0.5, "val_accuracy": 0.5,
                 "epoch_seconds": 1.0, "lrs": {}, "best": False}
            )  # fmt: skip
        else:
            hook.epoch_end(
                phase="finetune", epoch=epoch, train_loss=0.5, val_accuracy=0.5, epoch_seconds=1.0
            )
        slowest = max(slowest, time.perf_counter() - started)
    return slowest


def test_posts_the_trainjob_status_shape_with_token_and_ca(status_server: StatusServer) -> None:
    reporter = TrainJobProgress(status_server.endpoint(), PLAN, min_interval_s=0.0)
    reporter.epoch_end(
        phase="finetune", epoch=3, train_loss=0.25, val_accuracy=0.875, epoch_seconds=12.0
    )
    (update,) = status_server.wait_for(1)
    status = update["trainerStatus"]
    assert set(update) == {"trainerStatus"}
    # Position: the head's 2 epochs + 3 of finetune's 8 = 5 of 10; 5 left at 12 s each.
    assert status["progressPercentage"] == 50
    assert status["estimatedRemainingSeconds"] == 60
    assert status["metrics"] == [
        {"name": "train_loss", "value": "0.25"},
        {"name": "val_accuracy", "value": "0.875"},
        {"name": "phase", "value": "finetune"},
        {"name": "epoch", "value": "3/8"},
    ]
    assert time.strptime(status["lastUpdatedTime"], "%Y-%m-%dT%H:%M:%SZ")
    for metric in status["metrics"]:  # the CRD's limits
        assert 1 <= len(metric["name"]) <= MAX_METRIC_CHARS
        assert 1 <= len(metric["value"]) <= MAX_METRIC_CHARS
    reporter.close()
    assert (reporter.sent, reporter.failures, status_server.refused) == (1, 0, 0)


def test_the_token_is_read_again_for_every_update(status_server: StatusServer) -> None:
    reporter = TrainJobProgress(status_server.endpoint(), PLAN, min_interval_s=0.0)
    reporter.epoch_end(phase="head", epoch=1, train_loss=1.0, val_accuracy=0.3, epoch_seconds=1)
    status_server.wait_for(1)
    status_server.token_file.write_text("token-2\n")  # the kubelet rotated it
    reporter.epoch_end(phase="head", epoch=2, train_loss=0.9, val_accuracy=0.4, epoch_seconds=1)
    updates = status_server.wait_for(2)
    reporter.close()
    assert [u["trainerStatus"]["progressPercentage"] for u in updates] == [10, 20]
    assert (reporter.failures, status_server.refused) == (0, 0)


def test_a_server_the_ca_does_not_sign_is_refused(status_server: StatusServer, tmp_path: Path):
    other_ca, _ = make_certificate(tmp_path / "other")
    endpoint = StatusEndpoint(status_server.url, other_ca, status_server.token_file)
    reporter = TrainJobProgress(endpoint, PLAN, min_interval_s=0.0)
    reporter.epoch_end(phase="head", epoch=1, train_loss=1.0, val_accuracy=0.3, epoch_seconds=1)
    reporter.training_done()
    reporter.close()
    assert reporter.sent == 0 and reporter.failures >= 1
    assert status_server.received == []


def test_at_most_one_update_per_interval_and_the_newest_wins(status_server: StatusServer):
    reporter = TrainJobProgress(status_server.endpoint(), PLAN, min_interval_s=0.5)
    # The first send starts after this; the interval runs from that start, so the second
    # arrives at least 0.5 s after this (timed from the first arrival instead, the first
    # request's own latency on a loaded host would come off the interval).
    offered = time.monotonic()
    reporter.epoch_end(phase="finetune", epoch=1, train_loss=1, val_accuracy=0.5, epoch_seconds=1)
    status_server.wait_for(1)
    for epoch in range(2, 9):
        reporter.epoch_end(
            phase="finetune", epoch=epoch, train_loss=1 / epoch, val_accuracy=0.5, epoch_seconds=1
        )
    updates = status_server.wait_for(2)
    second_arrived = time.monotonic()
    reporter.close()
    assert updates[0]["trainerStatus"]["progressPercentage"] == 30  # sent at once
    # The seven epochs after it collapsed into one update, the last one's, after the interval.
    second = updates[1]["trainerStatus"]
    assert second["progressPercentage"] == 100
    assert {"name": "epoch", "value": "8/8"} in second["metrics"]
    assert second_arrived - offered >= 0.5
    assert len(status_server.received) == 2


def test_training_done_is_sent_at_close_after_the_interval(status_server: StatusServer):
    reporter = TrainJobProgress(status_server.endpoint(), PLAN, min_interval_s=0.3)
    offered = time.monotonic()  # before the first send starts, which starts the interval
    reporter.epoch_end(phase="head", epoch=2, train_loss=0.7, val_accuracy=0.6, epoch_seconds=1)
    status_server.wait_for(1)
    reporter.training_done()  # the last phase stopped early
    reporter.close()
    updates = status_server.wait_for(2)
    assert time.monotonic() - offered >= 0.3, "the interval holds for the final update too"
    final = updates[-1]["trainerStatus"]
    assert (final["progressPercentage"], final["estimatedRemainingSeconds"]) == (100, 0)
    assert {"name": "phase", "value": "head"} in final["metrics"]


def test_a_stopped_run_drops_its_pending_update(status_server: StatusServer):
    reporter = TrainJobProgress(status_server.endpoint(), PLAN, min_interval_s=30.0)
    reporter.epoch_end(phase="head", epoch=1, train_loss=1.0, val_accuracy=0.3, epoch_seconds=1)
    status_server.wait_for(1)
    reporter.epoch_end(phase="head", epoch=2, train_loss=0.9, val_accuracy=0.4, epoch_seconds=1)
    started = time.monotonic()
    reporter.close()  # a SIGTERM: no training_done
    assert time.monotonic() - started < 2.0
    assert len(status_server.received) == 1


def test_a_down_endpoint_costs_the_loop_nothing_and_logs_once(
    status_server: StatusServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"https://127.0.0.1:{closed_port()}{STATUS_PATH}"
    endpoint = StatusEndpoint(url, status_server.ca_file, status_server.token_file)
    reporter = TrainJobProgress(endpoint, PLAN, min_interval_s=0.0, timeout_s=0.5)
    observers = RunObservers(None, TrainingTelemetry(None), _stop(), reporter)
    with caplog.at_level(logging.INFO, logger="trainer.job.trainjob_progress"):
        slowest = 0.0
        for _ in range(5):
            slowest = max(slowest, timed_epoch_ends(observers, 4))
            time.sleep(0.05)  # let the sender fail between bursts
        reporter.close()
    assert slowest < HOOK_BUDGET_S, f"the hook took {slowest * 1000:.1f} ms"
    assert reporter.failures >= 2 and reporter.sent == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "training goes on" in warnings[0].getMessage()
    assert "token-1" not in caplog.text
    assert f"{reporter.failures} of {reporter.failures} updates failed" in caplog.text


def test_a_slow_endpoint_costs_the_loop_nothing(status_server: StatusServer) -> None:
    status_server.delay_s = 1.0
    reporter = TrainJobProgress(status_server.endpoint(), PLAN, min_interval_s=0.0, timeout_s=0.2)
    reporter.epoch_end(phase="head", epoch=1, train_loss=1.0, val_accuracy=0.3, epoch_seconds=1)
    time.sleep(0.05)  # the sender is now waiting on the endpoint
    assert timed_epoch_ends(reporter, 20) < HOOK_BUDGET_S
    started = time.monotonic()
    reporter.close()
    assert time.monotonic() - started < 2.0
    assert reporter.failures >= 1  # timed out, counted


def test_only_a_trainjob_environment_turns_it_on(tmp_path: Path) -> None:
    complete = {URL_ENV: "https://x/status", CA_CERT_ENV: "/ca.crt", TOKEN_ENV: "/token"}
    assert StatusEndpoint.from_env({}) is None
    for missing in complete:
        assert StatusEndpoint.from_env({k: v for k, v in complete.items() if k != missing}) is None
    assert trainjob_progress_from_env({}, PLAN) is None
    endpoint = StatusEndpoint.from_env(complete)
    assert endpoint == StatusEndpoint("https://x/status", Path("/ca.crt"), Path("/token"))


def _stop() -> StopRequest:
    return StopRequest(20.0, distributed=False, device=torch.device("cpu"))


@pytest.mark.slow
def test_a_training_run_reports_each_epoch_and_the_end(
    status_server: StatusServer, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.run import train

    monkeypatch.setenv(URL_ENV, status_server.url)
    monkeypatch.setenv(CA_CERT_ENV, str(status_server.ca_file))
    monkeypatch.setenv(TOKEN_ENV, str(status_server.token_file))
    summary = train(tiny_config(image_folder, tmp_path / "run", finetune_epochs=2))
    assert summary["status"] != "interrupted"
    updates = [u["trainerStatus"] for u in status_server.wait_for(2)]
    # The first epoch went out at once; the end waited out the 5 s interval and says 100 %.
    assert updates[0]["progressPercentage"] == 50
    assert {"name": "phase", "value": "finetune"} in updates[0]["metrics"]
    assert (updates[-1]["progressPercentage"], updates[-1]["estimatedRemainingSeconds"]) == (
        100,
        0,
    )
    assert status_server.refused == 0
