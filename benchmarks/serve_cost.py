"""The serving path's own cost: server CPU per request minus the model's CPU per image.

For ResNet-18 at 32 px (the model is cheap, so the serving path's cost shows) the server runs
as ``serve_throughput.py``'s system (b) (dynamic batching, max batch 8) under Triton's
perf_analyzer (batch 1) at each concurrency. In a measured window:

- **server CPU per request**: the server process's CPU time (``/proc/PID/stat``, every thread,
  onnxruntime's pool included) over the requests it answered (``inference_requests_total``);
- the **mean server batch** the dynamic batcher formed (its batch-size histogram);
- **model CPU per image**: in-process onnxruntime (the same graph, the server's thread count)
  running batches of that mean size, round to the nearest whole batch, its process CPU time
  per image.

The **overhead** is the difference: what receiving, decoding the protobuf, batching, answering
and counting cost per request beyond the model; the target is at most 0.20 ms (for gRPC,
below what grpcio's asyncio layer costs on its own: ``grpc_floor.py``).

``--baseline REF`` also runs the server of another release (``git archive REF``, the same
virtual environment) in the same run, alternating with this tree's window by window
(``--rounds``), and reports both servers' CPU per request and their ratio: the server CPU
per request is the figure that compares, the model's CPU per image being the same graph.

Each cell runs once per protocol in ``--protocol`` (default both): perf_analyzer over gRPC, and
over the same server's HTTP/REST listener (the Open Inference Protocol's JSON and binary-data
bodies; perf_analyzer sends binary data).

    .venv/bin/python benchmarks/serve_cost.py \\
        --perf-analyzer "$(../shared/tools/ensure-perf-analyzer)" \\
        [--baseline 4a36ff7 --rounds 2] [--protocol grpc]

Prints a table and writes ``bench-output/serve_cost.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from serve_profile import _cpu_seconds, _server_pid, perf_analyzer_load, requests_answered
from serve_throughput import (
    ModelCase,
    batch_histogram,
    build_repository,
    free_port,
    running,
    server_command,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[1]
CASE = ModelCase(name="resnet18_32", arch="resnet18", size=32, num_classes=5, max_batch_size=8)
GOAL_MS = 0.20


@dataclass(frozen=True)
class Cell:
    """One measured cell: the protocol perf_analyzer speaks and its concurrency."""

    protocol: str
    concurrency: int


def server_window(  # noqa: PLR0913  the tools, the cell and where the server's source is
    repo: Path,
    perf_analyzer: Path,
    cell: Cell,
    seconds: float,
    logs: Path,
    source: Path = ROOT,
) -> dict[str, float]:
    """Server CPU ms per request and the mean batch under perf_analyzer in ``cell``, for the
    server whose source tree is ``source``."""
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    command = server_command(repo, CASE, port, metrics_port, CASE.max_batch_size, http_port)
    log_path = logs / f"server-{source.name}-{cell.protocol}-c{cell.concurrency}.log"
    load_port = http_port if cell.protocol == "http" else port
    with running(command, log_path, cwd=source):
        asyncio.run(wait_ready(f"127.0.0.1:{port}", CASE.name, 120, log_path))
        pid = _server_pid(port)
        load = perf_analyzer_load(
            perf_analyzer, CASE.name, load_port, cell.concurrency, seconds + 4.0, cell.protocol
        )
        try:
            time.sleep(3.0)  # past perf_analyzer's start and the first batches' warm-up
            before = (requests_answered(metrics_port), _cpu_seconds(pid))
            batches_before = batch_histogram(metrics_port) or (0.0, 0.0)
            time.sleep(seconds)
            answered = requests_answered(metrics_port) - before[0]
            cpu = _cpu_seconds(pid) - before[1]
            batches = batch_histogram(metrics_port) or (0.0, 0.0)
        finally:
            load.terminate()
            load.wait(timeout=30)
    executions = batches[1] - batches_before[1]
    return {
        "requests_per_s": answered / seconds,
        "server_cpu_ms_per_request": 1000.0 * cpu / max(1, answered),
        "mean_server_batch": (batches[0] - batches_before[0]) / executions if executions else 0.0,
    }


def model_cpu_ms_per_image(onnx_path: Path, batch: int, seconds: float) -> float:
    """In-process onnxruntime CPU ms per image at ``batch`` (the server's thread count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    for _ in range(20):
        session.run(None, {name: images})
    started, cpu_before, runs = time.monotonic(), time.process_time(), 0
    while time.monotonic() - started < seconds:
        session.run(None, {name: images})
        runs += 1
    return 1000.0 * (time.process_time() - cpu_before) / (runs * batch)


def release_tree(ref: str, into: Path) -> Path:
    """The source tree of ``ref`` (``git archive``), unpacked under ``into``.

    Raises:
        SystemExit: ``ref`` names no commit of this repository (git's own message).
    """
    tree = into / "baseline"
    tree.mkdir(parents=True)
    found = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref], capture_output=True, check=False
    )
    if found.returncode != 0:
        reason = found.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise SystemExit(f"serve_cost: --baseline {ref!r} is not a commit here: {reason[0]}")
    archive = found.stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _mean(windows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each figure over ``windows``."""
    return {key: sum(w[key] for w in windows) / len(windows) for key in windows[0]}


def measure_cell(  # noqa: PLR0913  the tools, the cell, the servers and the options
    repo: Path,
    onnx_path: Path,
    perf_analyzer: Path,
    cell: Cell,
    baseline: tuple[str, Path] | None,
    args: argparse.Namespace,
    logs: Path,
) -> dict[str, object]:
    """One cell's row: this tree's server (and the baseline's, window for window), the model's
    CPU per image at the mean batch, the overhead and the ratio to the baseline."""
    sources = {"this": ROOT} | ({"baseline": baseline[1]} if baseline else {})
    windows: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
    for _ in range(args.rounds):
        for name, source in sources.items():
            windows[name].append(
                server_window(repo, perf_analyzer, cell, args.seconds, logs, source)
            )
    served = _mean(windows["this"])
    batch = max(1, round(served["mean_server_batch"]))
    model_ms = model_cpu_ms_per_image(onnx_path, batch, args.seconds / 2)
    row: dict[str, object] = {
        "protocol": cell.protocol,
        "concurrency": cell.concurrency,
        **served,
        "model_batch": batch,
        "model_cpu_ms_per_image": model_ms,
        "overhead_ms_per_request": served["server_cpu_ms_per_request"] - model_ms,
        "windows": windows["this"],
    }
    label = f"{cell.protocol} c={cell.concurrency}"
    if baseline:
        before = _mean(windows["baseline"])
        ratio = served["server_cpu_ms_per_request"] / before["server_cpu_ms_per_request"]
        row["baseline"] = {"ref": baseline[0], **before, "windows": windows["baseline"]}
        row["cpu_per_request_vs_baseline"] = ratio
        print(
            f"{label}: baseline {baseline[0]}: {before['requests_per_s']:.0f} req/s, server CPU "
            f"{before['server_cpu_ms_per_request']:.3f} ms/request; this tree / baseline "
            f"{ratio:.3f}",
            flush=True,
        )
    print(
        f"{label}: {served['requests_per_s']:.0f} req/s, mean batch "
        f"{served['mean_server_batch']:.2f}; server CPU "
        f"{served['server_cpu_ms_per_request']:.3f} ms/request, model {model_ms:.3f} ms/image "
        f"at batch {batch}: overhead {row['overhead_ms_per_request']:.3f} ms (goal <= {GOAL_MS})",
        flush=True,
    )
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perf-analyzer", type=Path, default=os.environ.get("PERF_ANALYZER"))
    parser.add_argument("--protocol", nargs="+", choices=["grpc", "http"], default=["grpc", "http"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell")
    parser.add_argument(
        "--baseline", default=None, help="a git ref whose server runs in the same cells"
    )
    parser.add_argument("--rounds", type=int, default=1, help="windows per server and cell")
    parser.add_argument("--output", type=Path, default=ROOT / "bench-output/serve_cost.json")
    args = parser.parse_args(argv)
    if args.perf_analyzer is None or not Path(args.perf_analyzer).is_file():
        print("serve_cost: --perf-analyzer is not set up (see the docstring)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="serve-cost-") as tmp:
        # The baseline first: a bad ref is refused before the model is built.
        baseline = (
            (args.baseline, release_tree(args.baseline, Path(tmp))) if args.baseline else None
        )
        repo = Path(tmp) / "repository"
        onnx_path = build_repository(repo, CASE)
        rows = [
            measure_cell(
                repo,
                onnx_path,
                args.perf_analyzer,
                Cell(protocol, concurrency),
                baseline,
                args,
                Path(tmp),
            )
            for protocol in args.protocol
            for concurrency in args.concurrency
        ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {"case": CASE.name, "load_average_at_end": os.getloadavg(), "rows": rows}
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    with contextlib.suppress(ValueError):
        print(f"wrote {args.output.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
