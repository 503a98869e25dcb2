"""torch -> ONNX with the dynamo exporter: dynamic batch dimension, one self-contained file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from contracts.graph_signature import INPUT_NAME, OUTPUT_NAMES, UINT8_NHWC
from trainer.export.errors import ExportError

log = logging.getLogger(__name__)

OPSET = 18
DYNAMO_EXPORTER = "torch.onnx.export(dynamo=True)"
LEGACY_EXPORTER = "torch.onnx.export(dynamo=False)"
# Export traces with a batch of 2: a batch of 1 lets the tracer specialise the dimension to a
# constant, which is exactly the silent fixed-batch bug this export must not have.
EXAMPLE_BATCH = 2
MAX_BATCH = 4096


def example_input(input_format: str, input_size: tuple[int, int], batch: int = EXAMPLE_BATCH):
    """A deterministic example batch in the graph's input format."""
    height, width = input_size
    generator = torch.Generator().manual_seed(0)
    if input_format == UINT8_NHWC:
        shape = (batch, height, width, 3)
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return torch.randn((batch, 3, height, width), generator=generator)


def export_onnx(
    module: nn.Module,
    path: Path,
    *,
    input_format: str,
    input_size: tuple[int, int],
    allow_legacy_fallback: bool = True,
) -> str:
    """Export ``module`` (in eval mode) to ``path`` and return the name of the exporter used.

    The dynamo exporter is the supported path. When it fails and ``allow_legacy_fallback`` is
    set, the TorchScript-based exporter is tried and the fallback is logged as a warning, so a
    published model never hides which exporter produced it.

    Raises:
        ExportError: both exporters failed (or the dynamo one did and fallback is off).
    """
    module.eval()
    example = example_input(input_format, input_size)
    try:
        _export_dynamo(module, example, path)
        return DYNAMO_EXPORTER
    except Exception as error:
        if not allow_legacy_fallback:
            raise ExportError(f"the dynamo ONNX exporter failed: {error}") from error
        log.warning(
            "the dynamo ONNX exporter failed (%s: %s); falling back to the legacy "
            "TorchScript exporter",
            type(error).__name__,
            error,
        )
    try:
        _export_legacy(module, example, path)
    except Exception as error:
        raise ExportError(f"both ONNX exporters failed; legacy exporter: {error}") from error
    return LEGACY_EXPORTER


def _export_dynamo(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={INPUT_NAME: {0: batch}},
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    program.save(str(path), external_data=False)


def _export_legacy(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=OPSET,
        )
