"""Serving throughput and latency: our server against onnxruntime itself and two baselines.

For each model (the demo ResNet-18 at 64 px and a ResNet-50-size model at 224 px, random
weights, uint8-nhwc input) and each concurrency (1, 8, 32) it measures:

  (a) in-process onnxruntime, back-to-back session.run at the largest batch the batcher can
      form, min(concurrency, max batch): the ceiling;
  (b) our server with dynamic batching;
  (c) our server with batching off (max batch size 1);
  (d) the naive baseline (benchmarks/naive_server.py: synchronous grpc server, thread pool,
      one session.run per request);
  (e) KServe's Python model server serving the same ONNX file, when --kserve-python names a
      Python that has kserve and onnxruntime installed;
  (g) Triton's perf_analyzer (C++ client, batch 1) against (b), when --perf-analyzer names the
      binary (benchmarks/perf_analyzer_cell.py); the issue's target is (g)/(a) >= 0.90 at
      concurrency 8 on ResNet-18 at 128 px (--models resnet18_128 --concurrency 8);
  (h), (j) the same against (b)'s OIP over HTTP/REST, with Triton's binary-tensor extension
      (h) and with JSON tensors (j).

(b)-(e) run as separate processes, all started before measuring, and are loaded over
loopback by the same asyncio load generator (``client bench``'s engine) with raw ModelInfer
requests of one image each. Each cell is measured in rounds that visit every system in turn,
so drifting load from other work on a shared machine is spread over all systems. The demo
model gets 6 s per cell (3 rounds), ResNet-50 12 s (2 rounds) at max batch 8. Prints a
Markdown table and the targets, and writes bench-output/serve_throughput.json; the servers'
logs go to bench-output/serve_throughput_logs/.

    python benchmarks/serve_throughput.py --kserve-python /tmp/kserve-venv/bin/python
    python benchmarks/serve_throughput.py --models demo --time-scale 0.2   # smoke run
    python benchmarks/serve_throughput.py --models resnet18_128 --concurrency 8 \
        --systems a b g h j --perf-analyzer "$(../shared/tools/ensure-perf-analyzer)"
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
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
from perf_analyzer_cell import WINDOWS, run_perf_analyzer

from client.api import AsyncInferenceClient, ModelInfo, RequestError, TensorSpec
from client.bench import MODEL_INFER_METHOD, infer_payload, raw_call
from client.connection import ConnectionOptions
from client.loadgen import LoadSpec, collect_load
from client.stats import LatencySummary

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = {
    "a": "onnxruntime in-process (ceiling)",
    "b": "server, dynamic batching",
    "c": "server, batching off",
    "d": "naive grpc server",
    "e": "KServe Python server",
    "f": "server, dynamic batching, one 1-thread session per core",
    "g": "perf_analyzer -> server, dynamic batching",
    "h": "perf_analyzer -> server over HTTP/REST, binary tensors",
    "j": "perf_analyzer -> server over HTTP/REST, JSON tensors",
}
# perf_analyzer's cells against (b): system -> (protocol, tensor format).
PERF_ANALYZER_CELLS = {"g": ("grpc", "binary"), "h": ("http", "binary"), "j": ("http", "json")}
# (f) is (b) tuned for a small CPU: onnxruntime's default spreads each run over every core,
# and on two cores its intra-op synchronisation costs more than it gains.
CPU_TUNED_FLAGS = ["--instances", str(os.cpu_count() or 1), "--intra-op-threads", "1"]


@dataclasses.dataclass(frozen=True)
class ModelCase:
    name: str
    arch: str
    size: int
    num_classes: int
    max_batch_size: int = 32
    max_queue_delay_us: int = 500
    # Per cell: measured seconds over all rounds, unmeasured load before each window, and the
    # number of interleaved rounds. A big model needs longer windows: at concurrency 32 its
    # answers come back in bursts of a whole batch, seconds apart.
    duration_s: float = 6.0
    warmup_s: float = 0.5
    rounds: int = 3


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


# ------------------------------------------------------------------------- measurement


class Accumulator:
    """Merges the windows of one (system, concurrency) cell across rounds."""

    def __init__(self) -> None:
        self.latencies_s: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.window_s = 0.0
        self.images = 0
        self.batch_sum = 0.0
        self.batch_count = 0.0
        # perf_analyzer reports percentiles, not samples: (p50 ms, p99 ms) per window.
        self.percentiles_ms: list[tuple[float, float]] = []

    def cell(self, model: str, system: str, concurrency: int, batch: int) -> Cell:
        summary = LatencySummary.from_seconds(self.latencies_s)
        p50, p99 = summary.p50_ms, summary.p99_ms
        if self.percentiles_ms:
            p50 = float(np.mean([p for p, _ in self.percentiles_ms]))
            p99 = float(np.mean([p for _, p in self.percentiles_ms]))
        return Cell(
            model=model,
            system=system,
            concurrency=concurrency,
            batch=batch,
            images_per_s=self.images / self.window_s if self.window_s else 0.0,
            p50_ms=p50,
            p99_ms=p99,
            errors=dict(self.errors),
            mean_server_batch=self.batch_sum / self.batch_count if self.batch_count else None,
        )


def in_process_window(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], window_s: float, into: Accumulator
) -> None:
    """Back-to-back session.run at one batch size: the ceiling a server can approach."""
    batch = len(feed["image"])
    start = time.perf_counter()
    while time.perf_counter() - start < window_s:
        t0 = time.perf_counter()
        session.run(None, feed)
        into.latencies_s.append(time.perf_counter() - t0)
        into.images += batch
    into.window_s += time.perf_counter() - start


async def server_window(
    target: str, case: ModelCase, spec: LoadSpec, metrics_port: int | None, into: Accumulator
) -> None:
    before = batch_histogram(metrics_port) if metrics_port else None
    async with AsyncInferenceClient(ConnectionOptions(target=target, timeout_s=60.0)) as client:
        call = raw_call(client, MODEL_INFER_METHOD, infer_payload(model_info(case), spec.batch))
        samples = await collect_load(call, spec)
    after = batch_histogram(metrics_port) if metrics_port else None
    into.latencies_s += samples.latencies_s
    into.errors.update(samples.errors)
    into.window_s += samples.window_s
    into.images += len(samples.latencies_s) * spec.batch
    if before and after:
        into.batch_sum += after[0] - before[0]
        into.batch_count += after[1] - before[1]


def perf_analyzer_window(  # noqa: PLR0913  one cell: the tool, the server, the load, the cell
    binary: Path,
    endpoint: Endpoint,
    case: ModelCase,
    spec: LoadSpec,
    system: str,
    into: Accumulator,
) -> None:
    """One perf_analyzer call of ``system`` (g, h, j) against ``endpoint`` (system (b)),
    merged into ``into``."""
    protocol, tensor_format = PERF_ANALYZER_CELLS[system]
    target = endpoint.target if protocol == "grpc" else endpoint.http_target
    assert target is not None
    before = batch_histogram(endpoint.metrics_port) if endpoint.metrics_port else None
    window_ms = max(500, int(spec.duration_s * 1000 / WINDOWS))
    try:
        result = run_perf_analyzer(
            binary,
            target,
            case.name,
            spec.concurrency,
            window_ms,
            protocol=protocol,
            tensor_format=tensor_format,
        )
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"  perf_analyzer failed: {str(error)[-600:]}", flush=True)
        into.errors["perf_analyzer failed"] += 1
        return
    after = batch_histogram(endpoint.metrics_port) if endpoint.metrics_port else None
    into.images += round(result.inferences_per_s * result.measured_s)
    into.window_s += result.measured_s
    into.percentiles_ms.append((result.p50_ms, result.p99_ms))
    if before and after:
        into.batch_sum += after[0] - before[0]
        into.batch_count += after[1] - before[1]


# ------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(
    command: Sequence[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> Iterator[None]:
    """Runs a server process for the duration of the block; SIGTERM, then SIGKILL, after it.

    Args:
        cwd: the source tree whose ``server`` package runs (another release's, to compare).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
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


def batch_histogram(metrics_port: int) -> tuple[float, float] | None:
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


def model_info(case: ModelCase) -> ModelInfo:
    """The served signature, so servers whose metadata omits inputs (KServe's) need none."""
    return ModelInfo(
        name=case.name,
        versions=("1",),
        platform="onnxruntime_onnx",
        inputs=(TensorSpec("image", "UINT8", (-1, case.size, case.size, 3)),),
        outputs=(),
        properties={},
    )


def server_command(  # noqa: PLR0913  the server's ports and its batching
    repo: Path,
    case: ModelCase,
    port: int,
    metrics_port: int,
    max_batch: int,
    http_port: int = -1,
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
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
        "--max-batch-size",
        str(max_batch),
        "--poll-interval-s",
        "0",
        # The repository is built without a golden set (this measures throughput, not checks).
        "--allow-versions-without-golden-set",
        "true",
        # onnxruntime's first run at a new batch shape is slow; warm the shapes the load forms.
        "--warmup-batch-sizes",
        ",".join(str(b) for b in sorted({1, min(8, max_batch), max_batch})),
    ]


@dataclasses.dataclass(frozen=True)
class Endpoint:
    system: str
    target: str
    metrics_port: int | None
    # OIP over HTTP/REST, where the system serves it (our server (b), for perf_analyzer).
    http_target: str | None = None


def start_servers(  # noqa: PLR0913  the systems under test need the case, its files and the run's directories
    stack: contextlib.ExitStack,
    case: ModelCase,
    repo: Path,
    onnx_path: Path,
    args: argparse.Namespace,
    logs: Path,
    workdir: Path,
) -> list[Endpoint]:
    """Starts every server system asked for, all at once, and waits until each is ready."""
    commands: list[tuple[str, list[str], int, int | None, int | None]] = []
    variants: tuple[tuple[str, int, list[str]], ...] = (
        ("b", case.max_batch_size, []),
        ("c", 1, []),
        ("f", case.max_batch_size, CPU_TUNED_FLAGS),
    )
    for system, max_batch, extra in variants:
        if system in args.systems:
            port, metrics = free_port(), free_port()
            http = free_port() if system == "b" else None
            command = server_command(repo, case, port, metrics, max_batch, http or -1)
            command += extra + args.server_flag
            commands.append((system, command, port, metrics, http))
    if "d" in args.systems:
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
        commands.append(("d", naive, port, None, None))
    if "e" in args.systems and args.kserve_python:
        port = free_port()
        kserve = [
            str(args.kserve_python),
            str(ROOT / "benchmarks" / "kserve_onnx_model.py"),
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
        commands.append(("e", kserve, port, None, None))
    endpoints = []
    for system, command, grpc_port, metrics_port, http_port in commands:
        stack.enter_context(running(command, logs / f"{case.name}-{system}.log"))
        http_target = f"127.0.0.1:{http_port}" if http_port else None
        endpoints.append(Endpoint(system, f"127.0.0.1:{grpc_port}", metrics_port, http_target))
    ready = []
    for endpoint in endpoints:
        log_path = logs / f"{case.name}-{endpoint.system}.log"
        try:
            asyncio.run(wait_ready(endpoint.target, case.name, args.start_timeout_s, log_path))
            ready.append(endpoint)
        except RuntimeError as exc:
            print(f"  ({endpoint.system}) skipped: {exc}", flush=True)
    return ready


def bench_model(  # noqa: PLR0913  one benchmark cell: the case, its files and the run's directories
    case: ModelCase,
    repo: Path,
    onnx_path: Path,
    args: argparse.Namespace,
    logs: Path,
    workdir: Path,
) -> list[Cell]:
    """Every system at every concurrency, in interleaved rounds.

    The machine is shared, so its load drifts; round-robin windows spread that drift over
    all systems instead of charging it to whichever ran at a bad moment.
    """
    cells: list[Cell] = []
    rounds = args.rounds or case.rounds
    window_s = case.duration_s * args.time_scale / rounds
    warmup_s = case.warmup_s * args.time_scale
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    with contextlib.ExitStack() as stack:
        endpoints = start_servers(stack, case, repo, onnx_path, args, logs, workdir)
        for concurrency in args.concurrency:
            batch = min(concurrency, case.max_batch_size)
            feed = {"image": rng.integers(0, 256, (batch, case.size, case.size, 3), np.uint8)}
            session.run(None, feed)
            spec = LoadSpec(concurrency=concurrency, duration_s=window_s, warmup_s=warmup_s)
            totals = {system: Accumulator() for system in SYSTEMS}
            for _ in range(rounds):
                if "a" in args.systems:
                    in_process_window(session, feed, window_s, totals["a"])
                for endpoint in endpoints:
                    asyncio.run(
                        server_window(
                            endpoint.target,
                            case,
                            spec,
                            endpoint.metrics_port,
                            totals[endpoint.system],
                        )
                    )
                    if endpoint.system != "b" or not args.perf_analyzer:
                        continue
                    for system in PERF_ANALYZER_CELLS:
                        if system in args.systems:
                            perf_analyzer_window(
                                args.perf_analyzer, endpoint, case, spec, system, totals[system]
                            )
            measured = ["a", *(e.system for e in endpoints)]
            measured += [s for s in PERF_ANALYZER_CELLS if totals[s].window_s or totals[s].errors]
            for system in measured:
                if system == "a" and "a" not in args.systems:
                    continue
                cell = totals[system].cell(
                    case.name, system, concurrency, batch if system == "a" else 1
                )
                cells.append(cell)
                print(
                    f"  {case.name} ({system}) c={concurrency}: {cell.images_per_s:.1f} img/s, "
                    f"p50 {cell.p50_ms:.2f} ms, p99 {cell.p99_ms:.2f} ms, "
                    f"errors {cell.errors or 0}",
                    flush=True,
                )
    return cells


def kserve_versions(python: Path | None) -> str | None:
    if python is None:
        return None
    code = "import importlib.metadata as m; print(m.version('kserve'), m.version('onnxruntime'))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"not importable: {result.stderr.strip()[-200:]}"
    kserve_version, ort_version = result.stdout.split()
    return f"kserve {kserve_version}, onnxruntime {ort_version}"


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
        # The perf_analyzer target: Triton's client against our server, at batch 8.
        ratio(
            "(g)/(a) throughput at c=8 (perf_analyzer)",
            model,
            find(cells, model, "g", 8),
            find(cells, model, "a", 8),
            0.90,
        )
        # The same client over HTTP/REST with binary tensors should cost what gRPC does (JSON
        # tensors are in the table, without a goal: their cost is the text encoding's).
        ratio(
            "(h)/(a) throughput at c=8 (perf_analyzer, HTTP binary)",
            model,
            find(cells, model, "h", 8),
            find(cells, model, "a", 8),
            0.90,
        )
        for ours in ("b", "f"):
            b = find(cells, model, ours, top)
            if b is None:
                continue
            for other, goal in (("a", 0.85), ("d", 2.0), ("e", 1.0)):
                name = f"({ours})/({other}) throughput at c={top}"
                ratio(name, model, b, find(cells, model, other, top), goal)
            b1, a1 = find(cells, model, ours, 1), find(cells, model, "a", 1)
            gap = None if b1 is None or a1 is None else b1.p50_ms - a1.p50_ms
            checks.append(
                {
                    "target": f"p50 ({ours}) c=1 minus (a) batch-1, ms",
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
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiplies every model's measurement and warm-up time (e.g. 0.2 for a smoke run)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds per cell (default: per model)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=None,
        help="the batcher's max_queue_delay_microseconds in every model's config.pbtxt "
        "(default: per model, 500)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["demo", "resnet50"],
        choices=["demo", "resnet50", "resnet18_32", "resnet18_128"],
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        default=list(SYSTEMS),
        choices=list(SYSTEMS),
        help="which of the systems (a)-(j) above to measure",
    )
    parser.add_argument(
        "--kserve-python",
        type=Path,
        default=None,
        help="Python with kserve and onnxruntime installed, for (e)",
    )
    parser.add_argument(
        "--perf-analyzer",
        type=Path,
        default=os.environ.get("PERF_ANALYZER") or None,
        help="Triton's perf_analyzer binary, for (g) (default: $PERF_ANALYZER)",
    )
    parser.add_argument(
        "--server-flag",
        action="append",
        default=[],
        help="a flag added to every command of our server, e.g. --server-flag=--event-loop=uvloop "
        "(repeatable)",
    )
    parser.add_argument("--start-timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench-output" / "serve_throughput.json"
    )
    args = parser.parse_args(argv)
    if args.perf_analyzer is not None and not Path(args.perf_analyzer).is_file():
        parser.error(f"--perf-analyzer {args.perf_analyzer} is not a file")
    if args.kserve_python is not None and not args.kserve_python.is_file():
        parser.error(f"--kserve-python {args.kserve_python} is not a file")
    if (args.rounds is not None and args.rounds < 1) or args.time_scale <= 0:
        parser.error("--rounds and --time-scale must be positive")
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency values must be >= 1")
    if args.max_queue_delay_us is not None and args.max_queue_delay_us < 0:
        parser.error("--max-queue-delay-us must be >= 0")
    return args


CASES = {
    "demo": ModelCase(name="demo", arch="resnet18", size=64, num_classes=5),
    # max batch 8: on two cores a batch of 8 already takes seconds, and the answers of a
    # bigger one would arrive in too few bursts to measure in a short window.
    "resnet50": ModelCase(
        name="resnet50",
        arch="resnet50",
        size=224,
        num_classes=1000,
        max_batch_size=8,
        duration_s=12.0,
        warmup_s=2.0,
        rounds=2,
    ),
    # The serving path's own cost: at 32 px the model is cheap and Python's share shows.
    "resnet18_32": ModelCase(
        name="resnet18_32",
        arch="resnet18",
        size=32,
        num_classes=5,
        max_batch_size=8,
        duration_s=12.0,
        warmup_s=1.0,
        rounds=3,
    ),
    # The perf_analyzer target's model: batches of 8 are the ceiling (a) at concurrency 8.
    "resnet18_128": ModelCase(
        name="resnet18_128",
        arch="resnet18",
        size=128,
        num_classes=5,
        max_batch_size=8,
        duration_s=12.0,
        warmup_s=1.0,
        rounds=3,
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    load_at_start = os.getloadavg()
    cells: list[Cell] = []
    logs = args.output.parent / "serve_throughput_logs"
    cases = {
        name: case
        if args.max_queue_delay_us is None
        else dataclasses.replace(case, max_queue_delay_us=args.max_queue_delay_us)
        for name, case in CASES.items()
    }
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        workdir = Path(tmp)
        repo = workdir / "repository"
        # torch stays out of this process: its thread pools would share the cores with the
        # in-process onnxruntime measurement.
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            onnx_paths = {
                name: pool.submit(build_repository, repo, cases[name]).result()
                for name in args.models
            }
        for name in args.models:
            cells += bench_model(cases[name], repo, onnx_paths[name], args, logs, workdir)
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
            # Other work on a shared machine moves every figure; the load says how much.
            "load_average_start": load_at_start,
            "load_average_end": os.getloadavg(),
            "kserve": kserve_versions(args.kserve_python),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cases": [dataclasses.asdict(cases[n]) for n in args.models],
        "cells": [dataclasses.asdict(c) for c in cells],
        "targets": checks,
        "elapsed_s": time.time() - started,
    }
    write_json(args.output, _json_safe(document))
    print(f"\nwrote {args.output} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
