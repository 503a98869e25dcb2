"""Where a request's time goes in the server: a sampling profile under Triton's perf_analyzer.

For ResNet-18 at 32 px (the model is cheap, so the serving path's own cost shows) and at 128 px
(the perf_analyzer target's model), this starts the server as ``serve_throughput.py``'s system
(b) (dynamic batching, max batch 8), drives it with perf_analyzer (gRPC, batch 1, concurrency
8) and meanwhile measures, per request the server answered in the window (its
``inference_requests_total``):

- the process's CPU time (``/proc/PID/stat``, every thread: onnxruntime's pool included);
- the time some thread held the GIL, sampled by py-spy (``--gil --native``: only the thread
  holding the GIL, C frames beside Python ones). The GIL is the serving path's one lane: all
  of gRPC's asyncio layer, protobuf, the handlers, the batcher and the metrics run in it, and
  onnxruntime releases it while it computes. Its busy share of the wall clock says how close
  Python is to being the bottleneck;
- where that GIL time goes, by layer (the leaf-most frame that belongs to a known layer names
  it: protobuf, gRPC, the asyncio loop, numpy, Prometheus metrics, our server's Python, the
  interpreter itself) and by leaf function.

Prints both tables and writes ``bench-output/serve_profile.json``. py-spy is not a dependency
of the project: ``.venv/bin/python -m pip install py-spy`` (or ``uv pip install py-spy``) first;
without it, or without perf_analyzer, the script says so and exits 2.

    .venv/bin/python benchmarks/serve_profile.py \\
        --perf-analyzer "$(../shared/tools/ensure-perf-analyzer)"
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from serve_throughput import (
    ModelCase,
    build_repository,
    free_port,
    running,
    server_command,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[1]
CASES = (
    ModelCase(name="resnet18_32", arch="resnet18", size=32, num_classes=5, max_batch_size=8),
    ModelCase(name="resnet18_128", arch="resnet18", size=128, num_classes=5, max_batch_size=8),
)
CONCURRENCY = 8
# Leaf-most first match wins; the markers are substrings of py-spy's frame names.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("onnxruntime compute", ("onnxruntime", "run (onnxruntime", "InferenceSession")),
    ("protobuf", ("protobuf", "_pb2", "upb_", "google::protobuf", "_message")),
    ("gRPC core and its asyncio layer", ("grpc", "cygrpc", "_cython")),
    ("Prometheus metrics", ("prometheus_client",)),
    ("numpy", ("numpy", "multiarray")),
    ("asyncio event loop", ("asyncio", "selectors", "uvloop", "epoll")),
    ("our server's Python", ("server/",)),
    ("threads, futures and locks", ("threading", "pthread", "futex", "concurrent/futures")),
)
OTHER = "the interpreter and the rest"


@dataclasses.dataclass
class Profile:
    case: str
    seconds: float
    requests: int
    cpu_seconds: float
    samples: int
    rate: int
    by_layer: dict[str, int]
    by_function: dict[str, int]

    def ms_per_request(self, samples: int) -> float:
        return 1000.0 * samples / self.rate / self.requests if self.requests else float("nan")


def layer_of(stack: Sequence[str]) -> str:
    """The layer of a sample: the leaf-most frame that matches a layer's marker."""
    for frame in reversed(stack):
        for layer, markers in LAYERS:
            if any(marker in frame for marker in markers):
                return layer
    return OTHER


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's ``--format raw`` (collapsed stacks): ``frame;frame;... count`` per line."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            # The first frame is the thread's name (py-spy --threads is off: the process).
            stacks.append((frames.split(";"), int(count)))
    return stacks


def requests_answered(metrics_port: int) -> int:
    """The server's ``inference_requests_total`` summed over outcomes."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("inference_requests_total{")
        )
    )


def profile_case(  # noqa: PLR0913  one case: the tools, the case, the window, the files
    case: ModelCase,
    repo: Path,
    perf_analyzer: Path,
    py_spy: Path,
    seconds: float,
    rate: int,
    logs: Path,
) -> Profile:
    """Start the server, load it with perf_analyzer, sample it with py-spy; the profile."""
    port, metrics_port = free_port(), free_port()
    command = server_command(repo, case, port, metrics_port, case.max_batch_size)
    log_path = logs / f"{case.name}-server.log"
    with running(command, log_path), tempfile.TemporaryDirectory() as tmp:
        import asyncio

        asyncio.run(wait_ready(f"127.0.0.1:{port}", case.name, 120, log_path))
        pid = _server_pid(port)
        load = perf_analyzer_load(perf_analyzer, case.name, port, CONCURRENCY, seconds)
        try:
            time.sleep(3.0)  # past perf_analyzer's start and the first batches' warm-up
            before = requests_answered(metrics_port)
            cpu_before = _cpu_seconds(pid)
            raw = Path(tmp) / "profile.txt"
            subprocess.run(
                [
                    str(py_spy),
                    "record",
                    *("--pid", str(pid), "--rate", str(rate), "--duration", str(int(seconds))),
                    *("--gil", "--native", "--format", "raw", "--output", str(raw)),
                ],
                check=True,
                capture_output=True,
            )
            answered = requests_answered(metrics_port) - before
            cpu = _cpu_seconds(pid) - cpu_before
        finally:
            load.terminate()
            load.wait(timeout=30)
        stacks = read_raw(raw)
    by_layer: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    for stack, count in stacks:
        by_layer[layer_of(stack)] += count
        by_function[stack[-1]] += count
    return Profile(
        case.name,
        seconds,
        answered,
        cpu,
        sum(by_layer.values()),
        rate,
        dict(by_layer.most_common()),
        dict(by_function.most_common(15)),
    )


def perf_analyzer_load(  # noqa: PLR0913  the tool, the cell and the protocol
    perf_analyzer: Path,
    model: str,
    port: int,
    concurrency: int,
    seconds: float,
    protocol: str = "grpc",
) -> subprocess.Popen[bytes]:
    """perf_analyzer driving ``model`` over ``protocol`` (``grpc`` or ``http``, at ``port``) at
    batch 1 and ``concurrency``, in windows of ``seconds``, for as long as the caller measures
    (it terminates it)."""
    return subprocess.Popen(
        [
            str(perf_analyzer),
            *("-m", model, "-u", f"127.0.0.1:{port}", "-i", protocol, "-b", "1"),
            *("--concurrency-range", f"{concurrency}:{concurrency}"),
            *("--measurement-mode", "time_windows", "-p", str(int(seconds * 1000))),
            *("-s", "1000", "-r", "2"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid``, every thread."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_pid(port: int) -> int:
    """The pid of the process listening on ``port`` (the server, not the shell around it)."""
    listing = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    start = listing.index("pid=") + len("pid=")
    return int(listing[start : listing.index(",", start)])


def format_profile(profile: Profile) -> str:
    total = profile.samples or 1
    held_s = profile.samples / profile.rate
    lines = [
        f"\n{profile.case}: {profile.requests} requests in {profile.seconds:.0f} s "
        f"({profile.requests / profile.seconds:.1f}/s); process CPU "
        f"{1000 * profile.cpu_seconds / max(profile.requests, 1):.2f} ms per request; "
        f"GIL held {profile.ms_per_request(profile.samples):.2f} ms per request, "
        f"{held_s / profile.seconds:.0%} of the wall clock ({profile.samples} samples at "
        f"{profile.rate} Hz)",
        "",
        "| layer (GIL held) | share of samples | ms per request |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {layer} | {count / total:.1%} | {profile.ms_per_request(count):.2f} |"
        for layer, count in profile.by_layer.items()
    ]
    lines += ["", "| leaf function (GIL held) | share of samples |", "|---|---:|"]
    lines += [
        f"| `{name[:90]}` | {count / total:.1%} |" for name, count in profile.by_function.items()
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perf-analyzer", type=Path, default=os.environ.get("PERF_ANALYZER"))
    parser.add_argument(
        "--py-spy", type=Path, default=shutil.which("py-spy", path=str(Path(sys.executable).parent))
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="sampled seconds per case")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--output", type=Path, default=ROOT / "bench-output/serve_profile.json")
    args = parser.parse_args(argv)
    for name, tool in (("--perf-analyzer", args.perf_analyzer), ("--py-spy", args.py_spy)):
        if tool is None or not Path(tool).is_file():
            print(f"serve_profile: {name} is not set up (see the docstring)", file=sys.stderr)
            return 2
    profiles = []
    with tempfile.TemporaryDirectory(prefix="serve-profile-") as tmp:
        repo = Path(tmp) / "repository"
        for case in CASES:
            build_repository(repo, case)
        for case in CASES:
            profile = profile_case(
                case, repo, args.perf_analyzer, args.py_spy, args.seconds, args.rate, Path(tmp)
            )
            print(format_profile(profile), flush=True)
            profiles.append(profile)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "load_average_at_end": os.getloadavg(),
        "concurrency": CONCURRENCY,
        "profiles": [dataclasses.asdict(p) for p in profiles],
    }
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    with contextlib.suppress(ValueError):
        print(f"\nwrote {args.output.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
