"""The server pinned to one core: onnxruntime's default threads against the CPU-budget plan.

Before the thread plan the server left onnxruntime's pools at 0, so onnxruntime sized them by
the host's physical cores and let them spin, whatever CPUs the process could really use
(onnxruntime issue 29510). This benchmark starts the server under ``taskset -c CPU`` (one
core) on a ResNet-18 at 128 px (random weights, max batch 8) twice:

  (before) onnxruntime's defaults as the server ran them before:
           ``--intra-op-threads H --inter-op-threads H --ort-spinning on
           --preprocess-workers 2``, where H is the intra-op thread count onnxruntime picks by
           itself in a process under the same pinning (measured here by counting the threads a
           default session starts; the host's physical cores), spinning on is onnxruntime's
           default, and 2 was the old decode pool. The server runs sessions sequentially, so
           onnxruntime starts no inter-op pool either way;
  (after)  the defaults now: no thread flags (one intra-op thread, spinning off, one decode
           thread under a one-core budget).

Both servers run at once on the same core and are loaded in turn, round by round, by the
project's load generator (``client bench``'s engine: closed loop, raw ModelInfer requests of
one image) at concurrency 8, from the other cores. Each round is one window per
configuration; the table gives the median over rounds of throughput, p50 and p99. Writes
bench-output/serve_cpu_budget.json; the servers' logs go to bench-output/serve_cpu_budget_logs/.

    python benchmarks/serve_cpu_budget.py
    python benchmarks/serve_cpu_budget.py --rounds 3 --window-s 2   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort
from serve_throughput import (
    CASES,
    Accumulator,
    Cell,
    ModelCase,
    _json_safe,
    build_repository,
    free_port,
    running,
    server_command,
    server_window,
    wait_ready,
    write_json,
)

from client.loadgen import LoadSpec

ROOT = Path(__file__).resolve().parents[1]
CASE = CASES["resnet18_128"]
OLD_DECODE_WORKERS = 2  # preprocess_workers' default before the thread plan

# Counts the threads one session adds in a process pinned like the server (Linux /proc):
# onnxruntime starts intra_op_threads - 1 pool threads at session creation.
_COUNT_POOL_THREADS = """
import os, sys
import onnxruntime as ort
before = len(os.listdir("/proc/self/task"))
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[2])
options.inter_op_num_threads = int(sys.argv[3])
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print(len(os.listdir("/proc/self/task")) - before)
"""


@dataclasses.dataclass(frozen=True)
class Configuration:
    name: str
    flags: tuple[str, ...]
    onnxruntime_threads: int  # pool threads a session starts, counted under the pinning


def pool_threads(taskset: str, cpu: int, onnx_path: Path, intra: int, inter: int) -> int:
    """Threads an onnxruntime session with these settings starts under ``taskset -c cpu``."""
    command = [taskset, "-c", str(cpu), sys.executable, "-c", _COUNT_POOL_THREADS]
    result = subprocess.run(
        [*command, str(onnx_path), str(intra), str(inter)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(result.stdout.split()[-1])


def configurations(taskset: str, cpu: int, onnx_path: Path) -> list[Configuration]:
    """(before) onnxruntime's defaults made explicit, checked by thread count; (after) no flags."""
    default_threads = pool_threads(taskset, cpu, onnx_path, 0, 0)
    intra = default_threads + 1  # the pool plus the calling thread
    before_threads = pool_threads(taskset, cpu, onnx_path, intra, intra)
    if before_threads != default_threads:
        print(
            f"warning: onnxruntime's defaults start {default_threads} pool threads, "
            f"the (before) flags {before_threads}",
            flush=True,
        )
    before = (
        "--intra-op-threads", str(intra), "--inter-op-threads", str(intra),
        "--ort-spinning", "on", "--preprocess-workers", str(OLD_DECODE_WORKERS),
    )  # fmt: skip
    return [
        Configuration("before", before, before_threads),
        Configuration("after", (), pool_threads(taskset, cpu, onnx_path, 1, 1)),
    ]


@dataclasses.dataclass(frozen=True)
class Row:
    """Medians over rounds of one configuration, and every round's cell."""

    configuration: str
    flags: str
    onnxruntime_pool_threads: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    mean_server_batch: float | None
    errors: int
    rounds: list[Cell]


def summarise(configuration: Configuration, cells: list[Cell]) -> Row:
    batches = [c.mean_server_batch for c in cells if c.mean_server_batch is not None]
    return Row(
        configuration=configuration.name,
        flags=" ".join(configuration.flags) or "(none)",
        onnxruntime_pool_threads=configuration.onnxruntime_threads,
        images_per_s=statistics.median(c.images_per_s for c in cells),
        p50_ms=statistics.median(c.p50_ms for c in cells),
        p99_ms=statistics.median(c.p99_ms for c in cells),
        mean_server_batch=statistics.median(batches) if batches else None,
        errors=sum(sum(c.errors.values()) for c in cells),
        rounds=cells,
    )


def measure(  # noqa: PLR0913  the case, its repository, the pinning, the settings and the logs
    case: ModelCase,
    repo: Path,
    configs: Sequence[Configuration],
    pin: list[str],
    args: argparse.Namespace,
    logs: Path,
) -> list[Row]:
    """Starts every configuration pinned, then loads each in turn for ``args.rounds`` rounds."""
    spec = LoadSpec(concurrency=args.concurrency, duration_s=args.window_s, warmup_s=args.warmup_s)
    cells: dict[str, list[Cell]] = {c.name: [] for c in configs}
    with contextlib.ExitStack() as stack:
        endpoints = {}
        for config in configs:
            port, metrics_port = free_port(), free_port()
            command = server_command(repo, case, port, metrics_port, case.max_batch_size)
            log_path = logs / f"{config.name}.log"
            stack.enter_context(running([*pin, *command, *config.flags], log_path))
            endpoints[config.name] = (f"127.0.0.1:{port}", metrics_port, log_path)
        for target, _, log_path in endpoints.values():
            asyncio.run(wait_ready(target, case.name, args.start_timeout_s, log_path))
        for round_index in range(args.rounds):
            for config in configs:
                target, metrics_port, _ = endpoints[config.name]
                totals = Accumulator()
                asyncio.run(server_window(target, case, spec, metrics_port, totals))
                cell = totals.cell(case.name, config.name, args.concurrency, 1)
                cells[config.name].append(cell)
                print(
                    f"  round {round_index + 1} ({config.name}): {cell.images_per_s:.1f} img/s, "
                    f"p50 {cell.p50_ms:.1f} ms, p99 {cell.p99_ms:.1f} ms, "
                    f"errors {cell.errors or 0}",
                    flush=True,
                )
    return [summarise(config, cells[config.name]) for config in configs]


def ratios(rows: Sequence[Row]) -> dict[str, float | None]:
    """after / before for throughput (higher is better) and p99 (lower is better)."""
    by_name = {r.configuration: r for r in rows}
    before, after = by_name["before"], by_name["after"]
    return {
        "throughput_after_over_before": (
            after.images_per_s / before.images_per_s if before.images_per_s else None
        ),
        "p99_after_over_before": after.p99_ms / before.p99_ms if before.p99_ms else None,
    }


def format_table(rows: Sequence[Row], load: tuple[float, float]) -> str:
    lines = [
        "| configuration | server flags | ORT pool threads | images/s | p50 ms | p99 ms "
        "| mean server batch | errors | load avg (start, end) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        batch = f"{r.mean_server_batch:.1f}" if r.mean_server_batch else ""
        lines.append(
            f"| {r.configuration} | `{r.flags}` | {r.onnxruntime_pool_threads} | "
            f"{r.images_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {batch} | {r.errors} | "
            f"{load[0]:.2f}, {load[1]:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    affinity = sorted(os.sched_getaffinity(0))
    parser.add_argument(
        "--cpu", type=int, default=affinity[-1], help="the one core the servers run on"
    )
    parser.add_argument("--rounds", type=int, default=3, help="windows per configuration")
    parser.add_argument("--window-s", type=float, default=8.0, help="measured seconds per window")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="load before each window")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--start-timeout-s", type=float, default=180.0)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench-output" / "serve_cpu_budget.json"
    )
    args = parser.parse_args(argv)
    if args.cpu not in affinity:
        parser.error(f"--cpu {args.cpu} is not one of this process's CPUs {affinity}")
    if args.rounds < 1 or args.window_s <= 0 or args.warmup_s < 0 or args.concurrency < 1:
        parser.error("--rounds, --window-s and --concurrency must be positive")
    return args


def build_model(workdir: Path) -> Path:
    """The ResNet-18 repository, exported in a child process so torch stays out of this one."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(build_repository, workdir / "repository", CASE).result()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    taskset = shutil.which("taskset")
    if taskset is None:
        print("skipped: taskset (util-linux) is not installed; it pins the server to one core")
        return 0
    started, load_at_start = time.time(), os.getloadavg()
    # The load generator keeps off the servers' core when there is another one.
    client_cpus = set(os.sched_getaffinity(0)) - {args.cpu}
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    with tempfile.TemporaryDirectory(prefix="serve-cpu-budget-") as tmp:
        onnx_path = build_model(Path(tmp))
        configs = configurations(taskset, args.cpu, onnx_path)
        pin = [taskset, "-c", str(args.cpu)]
        logs = args.output.parent / "serve_cpu_budget_logs"
        rows = measure(CASE, onnx_path.parents[2], configs, pin, args, logs)
    load = (load_at_start[0], os.getloadavg()[0])
    print()
    print(format_table(rows, load))
    figures = ratios(rows)
    print("\n" + ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if v is not None))
    document: dict[str, Any] = {
        "benchmark": "serve_cpu_budget",
        "command": "python benchmarks/serve_cpu_budget.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "onnxruntime": ort.__version__,
            "server_cpu": args.cpu,
            "client_cpus": sorted(client_cpus),
            # Other work on a shared machine moves every figure; the load says how much.
            "load_average_start": load_at_start,
            "load_average_end": os.getloadavg(),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "case": dataclasses.asdict(CASE),
        "rows": [dataclasses.asdict(r) for r in rows],
        "ratios": figures,
        "elapsed_s": time.time() - started,
    }
    write_json(args.output, _json_safe(document))
    print(f"\nwrote {args.output} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
