"""Decodes image files in a fresh process and prints what each cost, one JSON line per decode.

    python decode_cost_probe.py server DIR [NAME...]  # server.preprocess.decode_image, then
                                                      # Classify through a real server: each
                                                      # file, then each NAME twice in a request
    python decode_cost_probe.py trainer DIR           # trainer.data.image_decode's open_rgb and
                                                      # decode_image

Run by the decode-bomb tests: a fresh process is the only place where the peak memory of one
decode can be read, Pillow's C allocations included (tracemalloc does not see them). The peak is
the high-water mark after the decode (VmHWM, reset first where the kernel allows) minus the
resident memory before it, so an earlier, larger peak can only make a reading too high, never
too low. CPU is the whole process's (``time.process_time``): the server's threads run here.
Wall time is counted less the time the busiest thread (the one that ran longest: the decoding
one) was ready to run but waited for a CPU (its run-queue wait, /proc/self/task/*/schedstat):
on a busy machine that time is the other processes', not the decode's; on an idle one (or a
kernel without schedstat) it is nil and the reading is the plain wall time.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What decoding one image may cost, the budget: a decode costs ~0.8 s of CPU and
# ~245 MiB at most (the 50 MP 16-bit PNG, whose RGB image alone is 191 MiB).
MAX_CPU_S = 2.0
MAX_WALL_S = 3.0
MAX_PEAK_MIB = 300.0
# The server's defaults (server.config): 32 MiB, 50 M pixels, 32:1.
SERVER_MAX_BYTES = 32 << 20
SERVER_MAX_PIXELS = 50_000_000
SERVER_MAX_ASPECT = 32.0


def run(*arguments: str) -> dict[str, dict[str, Any]]:
    """Each decode's report, by name, from this script run in a fresh process."""
    done = subprocess.run(
        [sys.executable, __file__, *arguments],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,  # before the header check the JPEG alone took 90 s
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the probe failed:\n{done.stderr}")
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    return {report["name"]: report for report in reports}


def within_budget(report: dict[str, Any], images: int = 1) -> bool:
    """Whether a decode of ``images`` images kept to ``images`` times the budget."""
    return (
        report["cpu_s"] <= MAX_CPU_S * images
        and own_wall_s(report) <= MAX_WALL_S * images
        and report["peak_mib"] <= MAX_PEAK_MIB * images
    )


def own_wall_s(report: dict[str, Any]) -> float:
    """The decode's wall time without the time the machine kept its busiest thread waiting."""
    return float(report["wall_s"] - report["waited_s"])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _thread_times() -> dict[str, tuple[int, int]]:
    """Nanoseconds each live thread of this process has run and waited for a CPU."""
    times = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):  # a thread that just ended
            ran, waited = (task / "schedstat").read_text().split()[:2]
            times[task.name] = (int(ran), int(waited))
    return times


def _busiest_thread_wait_s(before: dict[str, tuple[int, int]]) -> float:
    """Run-queue wait since ``before`` of the thread that ran longest since then."""
    deltas = [
        (ran - before.get(tid, (0, 0))[0], waited - before.get(tid, (0, 0))[1])
        for tid, (ran, waited) in _thread_times().items()
    ]
    return max(deltas, default=(0, 0))[1] / 1e9


def _reset_peak() -> None:
    # VmHWM := VmRSS (Linux >= 4.0); where refused, the reading stays an upper bound.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def measure(
    name: str, refused: type[BaseException], call: Callable[..., object], *args: Any
) -> None:
    """Run ``call(*args)``; print its outcome ("ok" or "invalid", and what it returned or the
    refusal's message), CPU, wall and run-queue seconds and peak memory growth in MiB."""
    gc.collect()
    _reset_peak()
    rss = _status_kib("VmRSS")
    cpu, wall, threads = time.process_time(), time.perf_counter(), _thread_times()
    try:
        outcome, detail = "ok", str(call(*args))
    except refused as error:
        outcome, detail = "invalid", str(error)
    report = {
        "name": name,
        "outcome": outcome,
        "detail": detail,
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "waited_s": _busiest_thread_wait_s(threads),
        "peak_mib": (_status_kib("VmHWM") - rss) / 1024,
    }
    print(json.dumps(report), flush=True)


def probe_server(files: list[Path], pairs: list[str]) -> None:
    import grpc
    from PIL import Image
    from repository_factory import make_model_repository
    from server_harness import RunningServer, server_config

    from contracts.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
    from protocol.finetune.v1 import classifier_pb2, classifier_pb2_grpc
    from server.errors import InvalidInput
    from server.preprocess import ImageLimits, decode_image

    spec = Preprocessing((224, 224), 256, IMAGENET_MEAN, IMAGENET_STD)
    limits = ImageLimits(SERVER_MAX_BYTES, SERVER_MAX_PIXELS, SERVER_MAX_ASPECT)

    def shape(data: bytes) -> tuple[int, ...]:
        return decode_image(data, 0, spec, "uint8-nhwc", limits).shape

    for path in files:
        measure(f"decode_image/{path.name}", InvalidInput, shape, path.read_bytes())

    def classify(stub: classifier_pb2_grpc.ClassifierStub, images: list[bytes]) -> str:
        try:
            stub.Classify(classifier_pb2.ClassifyRequest(images=images), timeout=120)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                return f"{error.code().name}: {error.details()}"
            raise InvalidInput(error.details()) from None
        return "answered"

    with tempfile.TemporaryDirectory() as scratch:
        repository = make_model_repository(Path(scratch) / "models")
        config = server_config(repository, preprocess_workers=2)
        with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            warm_up = io.BytesIO()
            Image.new("RGB", (48, 40), (10, 200, 30)).save(warm_up, "PNG")
            classify(stub, [warm_up.getvalue()])  # the channel, the pools, the first run
            for path in files:
                measure(f"classify/{path.name}", InvalidInput, classify, stub, [path.read_bytes()])
            for name in pairs:
                data = (files[0].parent / name).read_bytes()
                measure(f"classify/{name} twice", InvalidInput, classify, stub, [data, data])


def probe_trainer(files: list[Path]) -> None:
    from trainer.data.image_decode import CorruptImage, decode_image, open_rgb

    for path in files:
        measure(f"open_rgb/{path.name}", CorruptImage, lambda p: open_rgb(p).size, path)
        measure(f"decode_image/{path.name}", CorruptImage, lambda p: decode_image(p).shape, path)


def main() -> None:
    half, folder, pairs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    files = sorted(folder.iterdir())
    if half == "server":
        probe_server(files, pairs)
    else:
        probe_trainer(files)


if __name__ == "__main__":
    main()
