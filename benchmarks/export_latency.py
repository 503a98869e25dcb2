"""CPU inference latency of the exported model: onnxruntime fp32 vs int8 vs PyTorch eager.

For each model (the demo model, resnet18 at 64 px, from ``--checkpoint`` or with random
weights; and ResNet-50 at 224 px with random weights, which is fine for speed), the script
builds exactly what the exporter publishes (the ``uint8-nhwc`` graph with preprocessing and
softmax inside) and times three engines on the same uint8 batches of 1, 8 and 32 images:

- ``torch-eager``: the same wrapper module in PyTorch eval mode under ``inference_mode``;
- ``ort-fp32``: the dynamo-exported ONNX graph in onnxruntime (CPU provider);
- ``ort-int8``: that graph after static QDQ int8 quantization (calibrated on 16 images).

The engines take turns run by run (the first one rotates), so load from other processes on a
shared machine hits all three alike. Because they alternate, no engine may keep its idle
threads spinning: that would steal the cores from the next one (onnxruntime's intra-op
spinning is switched off, and OpenMP's wait policy is set to passive before torch loads).
Each cell is the median of the timed runs; throughput is
batch / median latency. All engines use the same thread count (``--threads``, default: all
cores).

    .venv/bin/python benchmarks/export_latency.py

prints a table and writes ``bench-output/export_latency.json``.
"""

from __future__ import annotations

import os

# Before torch (and its OpenMP runtime) loads: idle OpenMP threads must sleep, not spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from trainer.checkpoint import load_checkpoint
from trainer.export.graph import ServingModel
from trainer.export.onnx_export import export_onnx
from trainer.export.ort_checks import GraphInput
from trainer.export.quantize import quantize_int8
from trainer.model.classifier import create_model, restore_classifier

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
BATCHES = (1, 8, 32)
ENGINES = ("torch-eager", "ort-fp32", "ort-int8")


@dataclass(frozen=True)
class Subject:
    name: str
    module: torch.nn.Module
    size: int
    weights: str


def subjects(checkpoint: Path | None) -> list[Subject]:
    torch.manual_seed(0)
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint)
        classifier, _ = restore_classifier(loaded)
        pre = loaded.header.preprocessing
        demo = Subject(
            f"demo {loaded.header.arch} @{pre.input_size[0]}px",
            ServingModel(
                classifier, input_format="uint8-nhwc", mean=list(pre.mean), std=list(pre.std)
            ),
            pre.input_size[0],
            str(checkpoint),
        )
    else:
        demo = Subject(
            "demo resnet18 @64px",
            ServingModel(
                create_model("resnet18", 4), input_format="uint8-nhwc", mean=MEAN, std=STD
            ),
            64,
            "random",
        )
    resnet50 = Subject(
        "resnet50 @224px",
        ServingModel(create_model("resnet50", 1000), input_format="uint8-nhwc", mean=MEAN, std=STD),
        224,
        "random",
    )
    return [demo, resnet50]


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build_engines(
    subject: Subject, work: Path, threads: int
) -> tuple[dict[str, Callable[[np.ndarray], object]], dict[str, float]]:
    """The three callables and how long building each artefact took (seconds)."""
    module = subject.module.eval()
    fp32, int8 = work / f"{subject.size}-fp32.onnx", work / f"{subject.size}-int8.onnx"
    started = time.perf_counter()
    export_onnx(module, fp32, input_format="uint8-nhwc", input_size=(subject.size, subject.size))
    exported = time.perf_counter()
    calibration = np.random.default_rng(1).integers(
        0, 256, (16, subject.size, subject.size, 3), dtype=np.uint8
    )
    quantize_int8(
        fp32,
        int8,
        mode="static",
        calibration_images=calibration,
        graph_input=GraphInput("uint8-nhwc", MEAN, STD),
    )
    quantized = time.perf_counter()
    fp32_session, int8_session = session(fp32, threads), session(int8, threads)

    def eager(images: np.ndarray) -> object:
        with torch.inference_mode():
            return module(torch.from_numpy(images))

    engines = {
        "torch-eager": eager,
        "ort-fp32": lambda images: fp32_session.run(None, {"image": images}),
        "ort-int8": lambda images: int8_session.run(None, {"image": images}),
    }
    timings = {"export_s": exported - started, "quantize_s": quantized - exported}
    return engines, timings


def measure(
    engines: dict[str, Callable[[np.ndarray], object]],
    images: np.ndarray,
    *,
    budget_s: float,
    min_rounds: int,
    max_rounds: int,
) -> dict[str, list[float]]:
    """Round-robin timed runs of every engine on the same batch, after one warm-up each."""
    for run in engines.values():
        run(images)
    times: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    started = time.perf_counter()
    for round_index in range(max_rounds):
        if round_index >= min_rounds and time.perf_counter() - started > budget_s:
            break
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            begin = time.perf_counter()
            engines[name](images)
            times[name].append(time.perf_counter() - begin)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="demo checkpoint (default: random)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--budget-s", type=float, default=2.0, help="timing per model and batch")
    parser.add_argument("--output", type=Path, default=Path("bench-output/export_latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    builds = {}
    with tempfile.TemporaryDirectory() as work_dir:
        for subject in subjects(args.checkpoint):
            engines, timings = build_engines(subject, Path(work_dir), args.threads)
            builds[subject.name] = timings
            for batch in BATCHES:
                images = np.random.default_rng(batch).integers(
                    0, 256, (batch, subject.size, subject.size, 3), dtype=np.uint8
                )
                times = measure(
                    engines, images, budget_s=args.budget_s, min_rounds=3, max_rounds=50
                )
                baseline = statistics.median(times["torch-eager"])
                for engine in ENGINES:
                    median = statistics.median(times[engine])
                    rows.append(
                        {
                            "model": subject.name,
                            "weights": subject.weights,
                            "engine": engine,
                            "batch": batch,
                            "runs": len(times[engine]),
                            "median_ms": round(1000 * median, 3),
                            "images_per_s": round(batch / median, 1),
                            "speedup_vs_eager": round(baseline / median, 2),
                        }
                    )

    print(
        f"{'model':<22} {'engine':<12} {'batch':>5} {'runs':>4} {'median ms':>10} "
        f"{'images/s':>9} {'vs eager':>8}"
    )
    for row in rows:
        print(
            f"{row['model']:<22} {row['engine']:<12} {row['batch']:>5} {row['runs']:>4} "
            f"{row['median_ms']:>10.2f} {row['images_per_s']:>9.1f} "
            f"{row['speedup_vs_eager']:>7.2f}x"
        )
    report = {
        "benchmark": "export_latency",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
        },
        "threads": args.threads,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "build_seconds": builds,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temp = args.output.with_suffix(".json.tmp")
    temp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temp, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
