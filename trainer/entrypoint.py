"""The ``trainer`` console script: checks the ``train`` extra, then runs the command line."""

from __future__ import annotations

from contracts.extras import require_extra

# What `trainer` imports beyond the base install (the `train` extra in pyproject.toml).
TRAIN_MODULES = ("torch", "torchvision", "onnx", "onnxruntime", "yaml", "tqdm", "matplotlib")


def main() -> int:
    """Entry point of the ``trainer`` console script; returns the exit code."""
    require_extra("trainer", "train", TRAIN_MODULES)
    from trainer.cli import main as run_cli

    return run_cli()
