"""Checks a model must pass before it is published; each failure raises ``ExportError``.

- ``onnx.checker`` with the full check (shape inference included);
- the graph signature of the architecture contract (names, types, a dynamic batch dimension);
- parity: onnxruntime (CPU) against PyTorch eval mode on random and real images at several
  batch sizes, the PyTorch side fed by the textbook preprocessing, not by the graph's own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from contracts.graph_signature import INPUT_NAME, LOGITS_NAME, OUTPUT_NAMES, UINT8_NHWC
from trainer.export.errors import ExportError
from trainer.export.graph import normalize_uint8_nhwc
from trainer.export.ort_checks import GraphInput, cpu_session

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 3, 17)


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute logit difference seen, the tolerance it was held to, and where."""

    max_abs_diff_logits: float
    tolerance: float
    batch_sizes: tuple[int, ...]
    reference: str
    per_source: dict[str, float] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, object]:
        return {
            "max_abs_diff_logits": self.max_abs_diff_logits,
            # An unbounded comparison (int8) has no tolerance; JSON has no infinity.
            "tolerance": None if math.isinf(self.tolerance) else self.tolerance,
            "batch_sizes": list(self.batch_sizes),
            "reference": self.reference,
            "per_source": self.per_source,
        }


def check_model(path: Path) -> onnx.ModelProto:
    """``onnx.checker`` full check; returns the loaded model."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return onnx.load(str(path))
    except Exception as error:
        raise ExportError(f"onnx.checker rejected {path.name}: {error}") from error


def check_signature(
    model: onnx.ModelProto, *, input_format: str, input_size: Sequence[int], num_classes: int
) -> None:
    """The graph has the contract's input and outputs, with a symbolic batch dimension."""
    height, width = (int(v) for v in input_size)
    if input_format == UINT8_NHWC:
        expected_in = (onnx.TensorProto.UINT8, [height, width, 3])
    else:
        expected_in = (onnx.TensorProto.FLOAT, [3, height, width])
    expected = {INPUT_NAME: expected_in}
    expected.update({name: (onnx.TensorProto.FLOAT, [num_classes]) for name in OUTPUT_NAMES})
    actual = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    names = [v.name for v in model.graph.input] + [v.name for v in model.graph.output]
    if names != [INPUT_NAME, *OUTPUT_NAMES]:
        raise ExportError(
            f"graph inputs/outputs are {names}, expected {[INPUT_NAME, *OUTPUT_NAMES]}"
        )
    for name, (elem_type, dims) in expected.items():
        tensor_type = actual[name].type.tensor_type
        shape = tensor_type.shape.dim
        if tensor_type.elem_type != elem_type:
            got = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
            want = onnx.TensorProto.DataType.Name(elem_type)
            raise ExportError(f"graph {name!r} has element type {got}, expected {want}")
        if not shape or shape[0].HasField("dim_value"):
            raise ExportError(f"graph {name!r} has a fixed batch dimension; it must be dynamic")
        rest = [d.dim_value if d.HasField("dim_value") else None for d in shape[1:]]
        if rest != dims:
            raise ExportError(f"graph {name!r} has dims {rest} after the batch, expected {dims}")


def random_images(batch: int, input_size: Sequence[int], seed: int) -> np.ndarray:
    """Uniform random uint8 NHWC images."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, int(input_size[0]), int(input_size[1]), 3), np.uint8)


def cycled(images: np.ndarray, batch: int) -> np.ndarray:
    """A batch of ``batch`` images taken from ``images`` in turn (repeating when too few)."""
    return images[np.arange(batch) % len(images)]


def parity_batches(
    input_size: Sequence[int], val_images: np.ndarray | None, batch_sizes: Sequence[int]
) -> list[tuple[str, np.ndarray]]:
    """(source, uint8 NHWC batch) pairs: random images, and real val images when given."""
    batches = [(f"random@{b}", random_images(b, input_size, seed=b)) for b in batch_sizes]
    if val_images is not None and len(val_images):
        batches += [(f"val@{b}", cycled(val_images, b)) for b in batch_sizes]
    return batches


def torch_parity(  # noqa: PLR0913  keyword-only parity inputs and tolerances
    path: Path,
    classifier: nn.Module,
    *,
    graph_input: GraphInput,
    input_size: Sequence[int],
    val_images: np.ndarray | None,
    tolerance: float = FP32_TOLERANCE,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
) -> ParityReport:
    """onnxruntime vs PyTorch eval mode on the same images; raises above the limit.

    The limit is ``tolerance * max(1, largest |reference logit|)``: float32 keeps about seven
    significant digits, so a head fitted with little regularisation (logits in the hundreds)
    differs by more than an absolute 1e-4 from mere summation order, not from a wrong graph.
    """
    classifier.eval()
    session = cpu_session(path)
    per_source: dict[str, float] = {}
    largest = 1.0
    for source, images in parity_batches(input_size, val_images, batch_sizes):
        with torch.no_grad():
            pixels = torch.from_numpy(images)
            reference = classifier(normalize_uint8_nhwc(pixels, graph_input.mean, graph_input.std))
        reference_np = reference.float().numpy()
        logits, probabilities = session.run(
            list(OUTPUT_NAMES), {INPUT_NAME: graph_input.feed(images)}
        )
        _check_outputs(source, logits, probabilities, reference_np.shape)
        per_source[source] = float(np.max(np.abs(logits - reference_np)))
        largest = max(largest, float(np.max(np.abs(reference_np))))
    return _report(per_source, tolerance * largest, batch_sizes, "torch-eval-fp32")


def onnx_parity(  # noqa: PLR0913  keyword-only parity inputs and tolerances
    candidate: Path,
    reference: Path,
    *,
    graph_input: GraphInput,
    input_size: Sequence[int],
    val_images: np.ndarray | None,
    tolerance: float | None,
    relative: bool = False,
    reference_name: str = "onnx-fp32",
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
) -> ParityReport:
    """A reduced-precision model against the verified fp32 ONNX model.

    With ``relative`` the limit is ``tolerance * max(1, largest |reference logit|)``, since
    half precision keeps about three significant digits whatever the logits' scale.
    ``tolerance=None`` measures without a limit (int8, where accuracy is the gate).
    """
    candidate_session, reference_session = cpu_session(candidate), cpu_session(reference)
    per_source: dict[str, float] = {}
    largest = 1.0
    for source, images in parity_batches(input_size, val_images, batch_sizes):
        feed = {INPUT_NAME: graph_input.feed(images)}
        expected = reference_session.run([LOGITS_NAME], feed)[0]
        logits, probabilities = candidate_session.run(list(OUTPUT_NAMES), feed)
        _check_outputs(source, logits, probabilities, expected.shape)
        per_source[source] = float(np.max(np.abs(logits - expected)))
        largest = max(largest, float(np.max(np.abs(expected))))
    limit = float("inf") if tolerance is None else tolerance * (largest if relative else 1.0)
    return _report(per_source, limit, batch_sizes, reference_name)


def _check_outputs(
    source: str, logits: np.ndarray, probabilities: np.ndarray, shape: tuple[int, ...]
) -> None:
    if logits.shape != shape or probabilities.shape != shape:
        raise ExportError(
            f"{source}: outputs have shapes {logits.shape} and {probabilities.shape}, "
            f"expected {shape}"
        )
    if logits.dtype != np.float32 or probabilities.dtype != np.float32:
        raise ExportError(
            f"{source}: outputs are {logits.dtype}/{probabilities.dtype}, not float32"
        )
    if not np.all(np.isfinite(logits)):
        raise ExportError(f"{source}: logits contain NaN or infinity")
    sums = probabilities.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-2):
        raise ExportError(f"{source}: probabilities do not sum to 1 (got {sums.tolist()})")


def _report(
    per_source: dict[str, float], tolerance: float, batch_sizes: Sequence[int], reference: str
) -> ParityReport:
    worst_source = max(per_source, key=lambda k: per_source[k])
    worst = per_source[worst_source]
    report = ParityReport(worst, tolerance, tuple(batch_sizes), reference, per_source)
    if not worst <= tolerance:
        raise ExportError(
            f"parity check failed: max abs logit difference {worst:.3g} against {reference} "
            f"(on {worst_source}) exceeds the tolerance {tolerance:.3g}"
        )
    log.debug(  # the export's parity step line says it
        "parity against %s: max abs logit difference %.3g (tolerance %.3g)",
        reference,
        worst,
        tolerance,
    )
    return report
