"""Triton's perf_analyzer runs to completion against the server (its statistics must agree).

perf_analyzer compares the server's ModelStatistics between measurements and aborts when the
queue/compute counts disagree ("Server side statistics compute counts must be the same"). The
binary is set up by ``../shared/tools/ensure-perf-analyzer`` (from the tritonclient wheel and
two libraries; see that script), or taken from ``$PERF_ANALYZER``; without either the test
skips and says why.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from server_harness import RunningServer, server_config

ENSURE = Path(__file__).resolve().parents[2].parent / "shared" / "tools" / "ensure-perf-analyzer"


def _perf_analyzer() -> str:
    given = os.environ.get("PERF_ANALYZER")
    if given:
        return given
    if not ENSURE.is_file():
        pytest.skip(f"perf_analyzer: neither $PERF_ANALYZER nor {ENSURE} exists")
    try:
        done = subprocess.run(
            [str(ENSURE)], check=False, capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"perf_analyzer: {ENSURE} did not finish in 900 s")
    path = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not path:
        pytest.skip(f"perf_analyzer could not be set up: {done.stderr.strip()[-500:]}")
    return path


@pytest.fixture(scope="module")
def perf_analyzer() -> str:
    return _perf_analyzer()


@pytest.mark.parametrize(
    "mode", [[], ["--streaming"], ["--async"]], ids=["sync", "stream", "async"]
)
def test_perf_analyzer_completes(
    perf_analyzer: str, model_repository: Path, mode: list[str]
) -> None:
    with RunningServer(server_config(model_repository)) as server:
        command = [
            perf_analyzer,
            *("-m", "classifier", "-u", server.target, "-i", "grpc", "-b", "2"),
            # A fixed request count instead of stability windows: a busy test machine must not
            # make the run fail for being noisy.
            *("--concurrency-range", "4", "--request-count", "300"),
            *mode,
        ]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "must be the same" not in output
    assert "Successful request count" in output  # it read ModelStatistics


@pytest.mark.parametrize("tensor_format", ["binary", "json"])
def test_perf_analyzer_completes_over_http(
    perf_analyzer: str, model_repository: Path, tensor_format: str
) -> None:
    # Triton's HTTP/REST client, with its binary-tensor extension and with JSON tensors.
    with RunningServer(server_config(model_repository, http_port=0)) as server:
        command = [
            perf_analyzer,
            *("-m", "classifier", "-u", f"127.0.0.1:{server.http_port}", "-i", "http"),
            *("-b", "2", "--concurrency-range", "4", "--request-count", "200"),
            *("--input-tensor-format", tensor_format, "--output-tensor-format", tensor_format),
        ]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "must be the same" not in output
    assert "Successful request count" in output
