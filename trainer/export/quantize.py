"""Reduced-precision variants of a verified fp32 model and what they cost in accuracy.

- ``fp16``: weights and activations in half precision for GPU serving; inputs and outputs keep
  their types (``keep_io_types``), so the graph signature is the same as fp32's.
- ``int8``: onnxruntime quantization for CPU serving; *static* (QDQ, per-channel weights,
  activation ranges calibrated on training images) or *dynamic* (weights only, activations
  quantized at run time).

Each variant is compared with the fp32 model on the val set (top-1 accuracy delta, in points)
and on CPU latency; an int8 model whose accuracy drops by more than the budget is refused.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from contracts.graph_signature import INPUT_NAME
from trainer.export.errors import ExportError
from trainer.export.images import ImageSet
from trainer.export.ort_checks import (
    GraphInput,
    cpu_session,
    median_latency_seconds,
    top1_accuracy,
)
from trainer.export.precisions import INT8_MODES

log = logging.getLogger(__name__)

DEFAULT_INT8_ACCURACY_BUDGET = 1.0
CALIBRATION_BATCH = 8
LATENCY_BATCH = 8


@dataclass(frozen=True)
class PrecisionComparison:
    """A variant against fp32: val accuracy (0..1) of both, delta in points, latency ratio."""

    val_accuracy_fp32: float | None
    val_accuracy: float | None
    val_images: int
    cpu_latency_ratio: float
    latency_batch: int

    @property
    def accuracy_delta_points(self) -> float | None:
        if self.val_accuracy is None or self.val_accuracy_fp32 is None:
            return None
        return round(100.0 * (self.val_accuracy - self.val_accuracy_fp32), 4)

    def as_metadata(self) -> dict[str, object]:
        return {
            "reference": "fp32",
            "val_accuracy_fp32": self.val_accuracy_fp32,
            "val_accuracy": self.val_accuracy,
            "val_accuracy_delta_points": self.accuracy_delta_points,
            "val_images": self.val_images,
            "cpu_latency_ratio": self.cpu_latency_ratio,
            "latency_batch": self.latency_batch,
        }


def convert_fp16(source: Path, target: Path) -> None:
    """Half-precision copy of ``source`` with fp32/uint8 inputs and fp32 outputs kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(target))


def quantize_int8(
    source: Path,
    target: Path,
    *,
    mode: str,
    calibration_images: np.ndarray | None,
    graph_input: GraphInput,
) -> None:
    """int8 copy of ``source``; ``calibration_images`` (uint8 NHWC) are needed for static.

    The softmax stays in float so ``probabilities`` keep their full resolution.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in INT8_MODES:
        raise ValueError(f"int8 mode must be one of {INT8_MODES}, got {mode!r}")
    model = onnx.load(str(source))
    # The exporter's value_info disagrees with the quantizer's own shape inference on some
    # graphs (a transposed Gemm weight); the quantizer re-infers everything it needs.
    del model.graph.value_info[:]
    softmax = [node.name for node in model.graph.node if node.op_type == "Softmax"]
    with tempfile.TemporaryDirectory() as work:
        clean = Path(work) / "clean.onnx"
        onnx.save(model, str(clean))
        if mode == "dynamic":
            quantize_dynamic(
                str(clean), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=softmax
            )
            return
        if calibration_images is None or not len(calibration_images):
            raise ExportError("static int8 quantization needs calibration images")
        batches = [
            graph_input.feed(calibration_images[i : i + CALIBRATION_BATCH])
            for i in range(0, len(calibration_images), CALIBRATION_BATCH)
        ]

        class _Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._batches: Iterator[np.ndarray] = iter(batches)

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch = next(self._batches, None)
                return None if batch is None else {INPUT_NAME: batch}

        quantize_static(
            str(clean),
            str(target),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=softmax,
        )


def compare_with_fp32(
    candidate: Path,
    fp32: Path,
    *,
    val: ImageSet | None,
    latency_images: np.ndarray,
    graph_input: GraphInput,
) -> PrecisionComparison:
    """Val accuracy of both models (when ``val`` is given) and the CPU latency ratio."""
    candidate_session, fp32_session = cpu_session(candidate), cpu_session(fp32)
    accuracy_fp32 = accuracy = None
    if val is not None:
        accuracy_fp32 = top1_accuracy(fp32_session, val, graph_input)
        accuracy = top1_accuracy(candidate_session, val, graph_input)
    feed = graph_input.feed(latency_images)
    ratio = median_latency_seconds(candidate_session, feed) / median_latency_seconds(
        fp32_session, feed
    )
    comparison = PrecisionComparison(
        val_accuracy_fp32=accuracy_fp32,
        val_accuracy=accuracy,
        val_images=0 if val is None else len(val),
        cpu_latency_ratio=round(ratio, 4),
        latency_batch=len(latency_images),
    )
    log.debug(  # the export's quantise step line says it
        "against fp32: val accuracy %s -> %s (%s points), CPU latency ratio %.3f",
        accuracy_fp32,
        accuracy,
        comparison.accuracy_delta_points,
        ratio,
    )
    return comparison


def check_accuracy_budget(comparison: PrecisionComparison, budget_points: float) -> None:
    """Refuse a model whose val accuracy is more than ``budget_points`` below fp32's."""
    delta = comparison.accuracy_delta_points
    if delta is None:
        raise ExportError("the int8 accuracy check needs val images")
    if -delta > budget_points:
        raise ExportError(
            f"int8 model refused: val accuracy dropped by {-delta:.2f} points "
            f"({comparison.val_accuracy_fp32:.4f} -> {comparison.val_accuracy:.4f} on "
            f"{comparison.val_images} images), more than the budget of {budget_points:g} points"
        )
