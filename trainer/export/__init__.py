"""Export a training checkpoint to a verified ONNX model in a Triton-layout repository."""

from trainer.export.errors import CheckpointError, ExportError
from trainer.export.pipeline import ExportResult, export_checkpoint

__all__ = ["CheckpointError", "ExportError", "ExportResult", "export_checkpoint"]
