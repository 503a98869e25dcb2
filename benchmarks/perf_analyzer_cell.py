"""One measurement by Triton's perf_analyzer against a running server, for serve_throughput.py.

perf_analyzer (Triton's own load tool, the one users run first) drives the server with its C++
gRPC client (or its HTTP/REST client, binary or JSON tensors): ``--concurrency-range C:C``
synchronous requests of batch 1, random input data, time windows of ``window_ms``. Stability
is not asked of it (``-s 1000``) because the machine's load drifts: three windows are measured
and averaged, and serve_throughput.py interleaves the calls with the other systems' windows.
Set perf_analyzer up with ``../shared/tools/ensure-perf-analyzer`` (it prints the path) or pass
any 2.51+ binary.
"""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import tempfile
from pathlib import Path

WINDOWS = 3


@dataclasses.dataclass(frozen=True)
class PerfAnalyzerResult:
    inferences_per_s: float
    measured_s: float
    p50_ms: float
    p99_ms: float


def run_perf_analyzer(  # noqa: PLR0913  perf_analyzer's options, each one of its flags
    binary: Path,
    target: str,
    model: str,
    concurrency: int,
    window_ms: int,
    *,
    protocol: str = "grpc",
    tensor_format: str = "binary",
) -> PerfAnalyzerResult:
    """Run perf_analyzer once and read its CSV report.

    ``protocol`` is ``grpc`` or ``http``; over HTTP, ``tensor_format`` (``binary``: Triton's
    binary-tensor extension, or ``json``) is used for the inputs and the outputs alike.

    Raises:
        RuntimeError: perf_analyzer failed; the message carries the end of its output.
    """
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        report = Path(tmp) / "report.csv"
        command = [
            str(binary),
            *("-m", model, "-u", target, "-i", protocol, "-b", "1"),
            *("--concurrency-range", f"{concurrency}:{concurrency}"),
            *("--measurement-mode", "time_windows", "-p", str(window_ms)),
            *("-s", "1000", "-r", str(WINDOWS)),
            *("--percentile", "99", "-f", str(report)),
        ]
        if protocol == "http":
            command += ["--input-tensor-format", tensor_format]
            command += ["--output-tensor-format", tensor_format]
        timeout_s = 60 + 4 * WINDOWS * window_ms / 1000
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if done.returncode != 0 or not report.exists():
            tail = (done.stdout + done.stderr)[-1500:]
            raise RuntimeError(f"perf_analyzer exited {done.returncode}: {tail}")
        with report.open() as handle:
            row = next(csv.DictReader(handle))
    # The CSV's latencies are in microseconds; with --percentile 99 the p99 column is the
    # reported percentile.
    return PerfAnalyzerResult(
        inferences_per_s=float(row["Inferences/Second"]),
        measured_s=WINDOWS * window_ms / 1000,
        p50_ms=float(row["p50 latency"]) / 1000,
        p99_ms=float(row["p99 latency"]) / 1000,
    )
