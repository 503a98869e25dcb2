"""Serving throughput and latency: our server against onnxruntime itself and two baselines.

For each model (the demo ResNet-18 at 64 px and a ResNet-50-size model at 224 px, random
weights, uint8-nhwc input) and each concurrency (1, 8, 32) it measures:

  (a) in-process onnxruntime at the batch the batcher can form, min(concurrency, max batch):
      the ceiling;
  (b) our server with dynamic batching;
  (c) our server with batching off (max batch size 1);
  (d) the naive baseline (benchmarks/naive_server.py: synchronous grpc server, thread pool,
      one session.run per request);
  (e) KServe's Python model server serving the same ONNX file, when --kserve-python names a
      Python that has kserve and onnxruntime installed.

(b)-(e) are loaded over loopback by the same asyncio load generator (``client bench``'s
engine) with raw ModelInfer requests of one image each. Prints a table and writes
bench-output/serve_throughput.json.

    python benchmarks/serve_throughput.py --kserve-python /tmp/kserve-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.client.api import AsyncInferenceClient, RequestError
from server.client.bench import bench_infer
from server.client.connection import ConnectionOptions
from server.client.loadgen import LoadSpec
from server.client.stats import LatencySummary

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = {
    "a": "onnxruntime in-process (ceiling)",
    "b": "server, dynamic batching",
    "c": "server, batching off",
    "d": "naive grpc server",
    "e": "KServe Python server",
}


@dataclasses.dataclass(frozen=True)
class ModelCase:
    name: str
    arch: str
    size: int
    num_classes: int
    max_batch_size: int = 32
    max_queue_delay_us: int = 500


@dataclasses.dataclass
class Cell:
    model: str
    system: str
    concurrency: int
    batch: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    mean_server_batch: float | None = None


# ---------------------------------------------------------------------------------- models


def build_repository(root: Path, case: ModelCase) -> Path:
    """Exports ``case`` (random weights) into a Triton-layout repository; returns the ONNX path."""
    import torch
    import torchvision

    class ServingGraph(torch.nn.Module):
        def __init__(self, classifier: torch.nn.Module) -> None:
            super().__init__()
            self.classifier = classifier
            # Plain tensors, not buffers: the exporter folds them into graph constants.
            self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            logits = self.classifier((x - self.mean) / self.std)
            return logits, torch.softmax(logits, dim=1)

    torch.manual_seed(0)
    classifier = getattr(torchvision.models, case.arch)(weights=None, num_classes=case.num_classes)
    module = ServingGraph(classifier).eval()
    model_dir = root / case.name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    onnx_path = version_dir / "model.onnx"
    example = torch.randint(0, 256, (2, case.size, case.size, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(onnx_path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits", "probabilities"],
            dynamic_axes={n: {0: "batch"} for n in ("image", "logits", "probabilities")},
            opset_version=17,
        )
    labels = [f"class_{i}" for i in range(case.num_classes)]
    (model_dir / "labels.txt").write_text("\n".join(labels) + "\n")
    (model_dir / "config.pbtxt").write_text(
        textwrap.dedent(
            f"""\
            name: "{case.name}"
            platform: "onnxruntime_onnx"
            max_batch_size: {case.max_batch_size}
            input [
              {{ name: "image" data_type: TYPE_UINT8 dims: [ {case.size}, {case.size}, 3 ] }}
            ]
            output [
              {{ name: "logits" data_type: TYPE_FP32 dims: [ {case.num_classes} ] }},
              {{ name: "probabilities" data_type: TYPE_FP32 dims: [ {case.num_classes} ]
                label_filename: "labels.txt" }}
            ]
            dynamic_batching {{ max_queue_delay_microseconds: {case.max_queue_delay_us} }}
            """
        )
    )
    metadata = {
        "labels": labels,
        "input_format": "uint8-nhwc",
        "input_size": [case.size, case.size],
        "resize_size": case.size,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "precision": "fp32",
        "arch": case.arch,
        "weights": "none",
    }
    (version_dir / "model.json").write_text(json.dumps(metadata, indent=2))
    return onnx_path


# ------------------------------------------------------------------------- (a) in-process


def measure_in_process(onnx_path: Path, size: int, batch: int, duration_s: float) -> Cell:
    """Back-to-back session.run at one batch size: the ceiling the server can approach."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {
        "image": np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    }
    for _ in range(3):
        session.run(None, feed)
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        t0 = time.perf_counter()
        session.run(None, feed)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    summary = LatencySummary.from_seconds(latencies)
    return Cell("", "a", 0, batch, len(latencies) * batch / elapsed, summary.p50_ms, summary.p99_ms)


# ------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(
    command: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[None]:
    """Runs a server process for the duration of the block; SIGTERM, then SIGKILL, after it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        try:
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_ready(target: str, model: str, timeout_s: float, log_path: Path) -> None:
    """Polls ModelMetadata until the server answers for ``model``."""
    deadline = time.monotonic() + timeout_s
    options = ConnectionOptions(target=target, timeout_s=2.0)
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with AsyncInferenceClient(options) as client:
                await client.model_metadata(model)
                return
        except RequestError as exc:
            last = exc
        await asyncio.sleep(0.25)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"{target} not ready for {model} after {timeout_s} s: {last}\n{tail}")


def mean_batch_from_metrics(metrics_port: int) -> tuple[float, float] | None:
    """(sum, count) of the server's batch-size histogram, or None when it has none."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = count = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#") or "batch_size" not in line:
            continue
        name, _, value = line.rpartition(" ")
        metric = name.split("{", 1)[0]
        if metric.endswith("batch_size_sum"):
            total += float(value)
            found = True
        elif metric.endswith("batch_size_count"):
            count += float(value)
    return (total, count) if found else None


async def load_cells(
    system: str,
    target: str,
    case: ModelCase,
    concurrencies: Sequence[int],
    duration_s: float,
    warmup_s: float,
    metrics_port: int | None = None,
) -> list[Cell]:
    cells = []
    options = ConnectionOptions(target=target, timeout_s=60.0)
    for concurrency in concurrencies:
        before = mean_batch_from_metrics(metrics_port) if metrics_port else None
        async with AsyncInferenceClient(options) as client:
            spec = LoadSpec(concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s)
            report = await bench_infer(client, spec, case.name)
        after = mean_batch_from_metrics(metrics_port) if metrics_port else None
        mean_batch = None
        if before and after and after[1] > before[1]:
            mean_batch = (after[0] - before[0]) / (after[1] - before[1])
        cells.append(
            Cell(
                case.name,
                system,
                concurrency,
                1,
                report.images_per_s,
                report.latency.p50_ms,
                report.latency.p99_ms,
                dict(report.errors),
                mean_batch,
            )
        )
        print(
            f"  {case.name} ({system}) c={concurrency}: {report.images_per_s:.1f} img/s, "
            f"p50 {report.latency.p50_ms:.2f} ms, errors {dict(report.errors) or 0}",
            flush=True,
        )
    return cells


def server_command(
    repo: Path, case: ModelCase, port: int, metrics_port: int, max_batch: int
) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from server.cli import main; sys.exit(main())",
        "--model-repository",
        str(repo),
        "--model-name",
        case.name,
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--max-batch-size",
        str(max_batch),
        "--poll-interval-s",
        "0",
    ]


KSERVE_MODEL = '''
import argparse
import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


class OnnxModel(kserve.Model):
    """The custom-model pattern of KServe's documentation, around an onnxruntime session."""

    def __init__(self, name, path):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self):
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        names = [o.name for o in self.session.get_outputs()]
        outputs = []
        for name, value in zip(names, self.session.run(names, feeds)):
            output = InferOutput(name=name, shape=list(value.shape), datatype="FP32")
            output.set_data_from_numpy(value, binary_data=True)
            outputs.append(output)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--model_name", required=True)
    args, _ = parser.parse_known_args()
    kserve.ModelServer().start([OnnxModel(args.model_name, args.model_path)])
'''


# ----------------------------------------------------------------------------------- run


def bench_model(
    case: ModelCase,
    workdir: Path,
    logs: Path,
    args: argparse.Namespace,
    onnx_path: Path,
    repo: Path,
) -> list[Cell]:
    cells: list[Cell] = []
    conc = args.concurrency
    print(f"{case.name}: (a) in-process onnxruntime", flush=True)
    for concurrency in conc:
        batch = min(concurrency, case.max_batch_size)
        cell = measure_in_process(onnx_path, case.size, batch, args.in_process_s)
        cell.model, cell.concurrency = case.name, concurrency
        cells.append(cell)
        print(
            f"  c={concurrency} batch {batch}: {cell.images_per_s:.1f} img/s, "
            f"p50 {cell.p50_ms:.2f} ms",
            flush=True,
        )

    def server_cells(
        system: str,
        command: list[str],
        port: int,
        metrics: int | None,
        env: dict[str, str] | None = None,
    ) -> list[Cell]:
        log_path = logs / f"{case.name}-{system}.log"
        print(f"{case.name}: ({system}) {SYSTEMS[system]}", flush=True)
        target = f"127.0.0.1:{port}"
        try:
            with running(command, log_path, env):
                asyncio.run(wait_ready(target, case.name, args.start_timeout_s, log_path))
                return asyncio.run(
                    load_cells(system, target, case, conc, args.duration_s, args.warmup_s, metrics)
                )
        except RuntimeError as exc:
            print(f"  skipped: {exc}", flush=True)
            return []

    for system, max_batch in (("b", case.max_batch_size), ("c", 1)):
        port, metrics = free_port(), free_port()
        cells += server_cells(
            system, server_command(repo, case, port, metrics, max_batch), port, metrics
        )
    port = free_port()
    naive = [
        sys.executable,
        str(ROOT / "benchmarks" / "naive_server.py"),
        "--model",
        str(onnx_path),
        "--model-name",
        case.name,
        "--port",
        str(port),
    ]
    cells += server_cells("d", naive, port, None)
    if args.kserve_python:
        script = workdir / "kserve_onnx_model.py"
        script.write_text(KSERVE_MODEL)
        port = free_port()
        command = [
            str(args.kserve_python),
            str(script),
            "--model_path",
            str(onnx_path),
            "--model_name",
            case.name,
            "--grpc_port",
            str(port),
            "--http_port",
            str(free_port()),
            "--enable_latency_logging",
            "false",
        ]
        cells += server_cells("e", command, port, None)
    return cells


def find(cells: Sequence[Cell], model: str, system: str, concurrency: int) -> Cell | None:
    return next(
        (c for c in cells if (c.model, c.system, c.concurrency) == (model, system, concurrency)),
        None,
    )


def evaluate_targets(
    cells: Sequence[Cell], models: Sequence[str], top: int
) -> list[dict[str, Any]]:
    """The issue's targets as ratios measured in this run."""
    checks: list[dict[str, Any]] = []

    def ratio(name: str, model: str, num: Cell | None, den: Cell | None, goal: float) -> None:
        if num is None or den is None or not den.images_per_s:
            checks.append(
                {"target": name, "model": model, "value": None, "goal": goal, "met": None}
            )
            return
        value = num.images_per_s / den.images_per_s
        checks.append(
            {"target": name, "model": model, "value": value, "goal": goal, "met": value >= goal}
        )

    for model in models:
        b = find(cells, model, "b", top)
        ratio(f"(b)/(a) throughput at c={top}", model, b, find(cells, model, "a", top), 0.85)
        ratio(f"(b)/(d) throughput at c={top}", model, b, find(cells, model, "d", top), 2.0)
        ratio(f"(b)/(e) throughput at c={top}", model, b, find(cells, model, "e", top), 1.0)
        b1, a1 = find(cells, model, "b", 1), find(cells, model, "a", 1)
        gap = None if b1 is None or a1 is None else b1.p50_ms - a1.p50_ms
        checks.append(
            {
                "target": "p50 (b) c=1 minus (a) batch-1, ms",
                "model": model,
                "value": gap,
                "goal": 1.5,
                "met": None if gap is None else gap <= 1.5,
            }
        )
    return checks


def format_table(cells: Sequence[Cell]) -> str:
    header = (
        "| model | system | conc. | batch | images/s | p50 ms | p99 ms | mean server batch "
        "| errors |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in cells:
        mean_batch = f"{c.mean_server_batch:.1f}" if c.mean_server_batch else ""
        errors = ", ".join(f"{k} {v}" for k, v in sorted(c.errors.items())) or "0"
        batch = str(c.batch) if c.system == "a" else "1"
        lines.append(
            f"| {c.model} | ({c.system}) {SYSTEMS[c.system]} | {c.concurrency} | "
            f"{batch} | {c.images_per_s:.1f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | "
            f"{mean_batch} | {errors} |"
        )
    return "\n".join(lines)


def format_targets(checks: Sequence[dict[str, Any]]) -> str:
    lines = ["| target | model | measured | goal | met |", "|---|---|---:|---:|---|"]
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        sign = "<=" if "minus" in c["target"] else ">="
        met = {True: "yes", False: "**no**", None: "not measured"}[c["met"]]
        lines.append(f"| {c['target']} | {c['model']} | {value} | {sign} {c['goal']} | {met} |")
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured load per cell")
    parser.add_argument(
        "--in-process-s",
        type=float,
        default=3.0,
        help="seconds of back-to-back session.run per (a) cell",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--models", nargs="+", default=["demo", "resnet50"], choices=["demo", "resnet50"]
    )
    parser.add_argument(
        "--kserve-python",
        type=Path,
        default=None,
        help="Python with kserve and onnxruntime installed, for (e)",
    )
    parser.add_argument("--start-timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench-output" / "serve_throughput.json"
    )
    args = parser.parse_args(argv)
    if args.kserve_python is not None and not args.kserve_python.is_file():
        parser.error(f"--kserve-python {args.kserve_python} is not a file")
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency values must be >= 1")
    return args


CASES = {
    "demo": ModelCase(name="demo", arch="resnet18", size=64, num_classes=5),
    "resnet50": ModelCase(name="resnet50", arch="resnet50", size=224, num_classes=1000),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    cells: list[Cell] = []
    logs = args.output.parent / "serve_throughput_logs"
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        workdir = Path(tmp)
        repo = workdir / "repository"
        onnx_paths = {name: build_repository(repo, CASES[name]) for name in args.models}
        for name in args.models:
            cells += bench_model(CASES[name], workdir, logs, args, onnx_paths[name], repo)
    checks = evaluate_targets(cells, args.models, max(args.concurrency))
    print()
    print(format_table(cells))
    print()
    print(format_targets(checks))
    document = {
        "benchmark": "serve_throughput",
        "command": "python benchmarks/serve_throughput.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "onnxruntime": ort.__version__,
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cases": [dataclasses.asdict(CASES[n]) for n in args.models],
        "cells": [dataclasses.asdict(c) for c in cells],
        "targets": checks,
        "elapsed_s": time.time() - started,
    }
    write_json(args.output, _json_safe(document))
    print(f"\nwrote {args.output} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
