"""Reading a training checkpoint and rebuilding its classifier for export."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.export.errors import CheckpointError
from trainer.models import create_model

log = logging.getLogger(__name__)

FORMAT = "finetune-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("arch", "num_classes", "classes", "head", "preprocessing", "model_state")
_PREPROCESSING = ("input_size", "resize_size", "mean", "std")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and validate a checkpoint written by ``trainer train``.

    Raises:
        CheckpointError: missing file, unreadable or truncated data, wrong format or
            version, or missing keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Resume state (numpy RNG state, optimizer extras) may hold objects the restricted
        # unpickler refuses; the file is our own trainer's output.
        log.warning("checkpoint %s needs the full unpickler (non-tensor resume state)", path)
        checkpoint = _load_full(path)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from error
    validate(checkpoint, path)
    return checkpoint


def _load_full(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from error


def validate(checkpoint: Any, path: Path) -> None:
    """The contract's keys are there with plausible values."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint")
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: format is {checkpoint.get('format')!r}, expected {FORMAT!r}"
        )
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {checkpoint.get('format_version')!r} is not supported "
            f"(this exporter reads version {FORMAT_VERSION})"
        )
    missing = [key for key in _REQUIRED if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing}")
    classes = checkpoint["classes"]
    if not isinstance(classes, list | tuple) or len(classes) != checkpoint["num_classes"]:
        raise CheckpointError(
            f"{path}: 'classes' must list num_classes={checkpoint['num_classes']} names"
        )
    preprocessing = checkpoint["preprocessing"]
    missing = [key for key in _PREPROCESSING if key not in (preprocessing or {})]
    if missing:
        raise CheckpointError(f"{path}: preprocessing is missing {missing}")
    if len(preprocessing["input_size"]) != 2 or len(preprocessing["mean"]) != 3:
        raise CheckpointError(f"{path}: preprocessing input_size must be [H, W], mean 3 floats")


def build_classifier(checkpoint: dict[str, Any]) -> tuple[nn.Module, str]:
    """The trained classifier in eval mode, and which state it came from.

    EMA weights are used when the checkpoint has them: they are what the trainer evaluated
    as its best model when EMA was on.
    """
    head = checkpoint.get("head") or {}
    model = create_model(
        checkpoint["arch"],
        int(checkpoint["num_classes"]),
        head_hidden=head.get("hidden"),
        head_dropout=float(head.get("dropout") or 0.0),
    )
    source = "ema_state" if checkpoint.get("ema_state") is not None else "model_state"
    state = _plain_state(checkpoint[source])
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"the checkpoint's {source} does not fit {checkpoint['arch']} with "
            f"{checkpoint['num_classes']} classes: {error}"
        ) from error
    return model.eval(), source


def _plain_state(state: dict[str, Any]) -> dict[str, Any]:
    # An EMA kept with torch.optim.swa_utils.AveragedModel saves "module."-prefixed keys and
    # an "n_averaged" counter; the classifier's own keys are what create_model expects.
    if any(key.startswith("module.") for key in state):
        return {
            key.removeprefix("module."): value
            for key, value in state.items()
            if key != "n_averaged"
        }
    return state
