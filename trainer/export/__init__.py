"""Export a training checkpoint to a verified ONNX model in a Triton-layout repository.

The public names are imported on first use, so ``trainer.export.cli`` and
``trainer.export.repository`` stay cheap to import (no torch, no onnx).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.export.errors import ExportError
    from trainer.export.exporter import ExportResult, export_checkpoint

__all__ = ["ExportError", "ExportResult", "export_checkpoint"]

_HOMES = {
    "ExportError": "trainer.export.errors",
    "ExportResult": "trainer.export.exporter",
    "export_checkpoint": "trainer.export.exporter",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'trainer.export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
