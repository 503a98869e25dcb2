"""What a served model carries about itself: ``model.json`` and the ONNX ``metadata_props``.

The document's keys and format are ``contracts.model_metadata``'s; this module fills them in.
The server builds its preprocessing and labels from them, so they come from the checkpoint,
never from constants here.
"""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import onnx

from contracts.model_metadata import ModelMetadata, metadata_from_props
from trainer.checkpoint import Checkpoint

_LIBRARIES = ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced and checked the model."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(directory: Path | None = None) -> str | None:
    """The commit of the source tree the exporter runs from, or ``None`` outside a checkout."""
    cwd = directory or Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def build_metadata(  # noqa: PLR0913  keyword-only facts of model.json, each from another step
    checkpoint: Checkpoint,
    *,
    input_format: str,
    precision: str,
    parity: Mapping[str, Any],
    exporter: str,
    extra: Mapping[str, Any] | None = None,
) -> ModelMetadata:
    """The version's ``model.json`` (``contracts.model_metadata``): the checkpoint's facts,
    then ``extra``, the facts of the export's later steps by their field names.

    The preprocessing is the checkpoint's ``Preprocessing``, so the server reads back exactly
    what the model was trained with.

    Raises:
        TypeError: an ``extra`` name that is not a key of the document, or a value JSON
            cannot hold.
    """
    header = checkpoint.header
    progress = checkpoint.progress.to_dict()
    facts = {
        key: _plain(value) if isinstance(value, Mapping) else value
        for key, value in (extra or {}).items()
    }
    return ModelMetadata(
        labels=tuple(header.classes),
        preprocessing=header.preprocessing,
        input_format=input_format,
        precision=precision,
        arch=header.arch,
        weights=header.weights,
        training=_plain(
            {"best_val_accuracy": progress["best_val_accuracy"], "epochs": progress["epochs"]}
        ),
        dataset_fingerprint=_plain(header.dataset_fingerprint),
        parity=_plain(parity),
        exporter=exporter,
        versions=library_versions(),
        git_commit=git_commit(),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        # How the model was adapted to unlabelled images from where it is used (counts,
        # methods, weights, the AdaBN decision): the checkpoint's record as it is.
        adaptation=None if checkpoint.adaptation is None else _plain(checkpoint.adaptation),
        calibration=checkpoint.calibration,
        **facts,
    )


def embed(model: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Set one ``metadata_props`` entry per key, its value JSON-encoded."""
    del model.metadata_props[:]
    for key, value in metadata.to_metadata_props().items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value


def read_embedded(model: onnx.ModelProto) -> dict[str, Any]:
    """The document ``embed`` stored (empty when the graph holds none)."""
    metadata = metadata_from_props({entry.key: entry.value for entry in model.metadata_props})
    return {} if metadata is None else metadata.to_dict()


def _plain(value: Any) -> Any:
    """``value`` as plain JSON types: checkpoints may hold numpy or torch scalars and tensors
    in their summary fields. Fails here, in the export, rather than in the server.

    Raises:
        TypeError: a value with no JSON form.
    """
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return _plain(value.tolist())
    if hasattr(value, "item"):
        return _plain(value.item())
    raise TypeError(f"cannot store {type(value).__name__} in model.json")
