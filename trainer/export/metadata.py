"""What a served model carries about itself: ``model.json`` and the ONNX ``metadata_props``.

The server builds its preprocessing and labels from these keys (architecture contract), so
they come from the checkpoint, never from constants here.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import onnx

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
) -> dict[str, Any]:
    """The ``model.json`` document (keys of the architecture contract, then ``extra``).

    The preprocessing keys are the checkpoint's ``Preprocessing.to_dict()``, top level, so the
    server reads them back with ``Preprocessing.from_dict``.
    """
    header = checkpoint.header
    progress = checkpoint.progress.to_dict()
    document: dict[str, Any] = {
        "labels": list(header.classes),
        "input_format": input_format,
        **header.preprocessing.to_dict(),
        "precision": precision,
        "arch": header.arch,
        "weights": header.weights,
        "training": {
            "best_val_accuracy": progress["best_val_accuracy"],
            "epochs": progress["epochs"],
        },
        "dataset_fingerprint": header.dataset_fingerprint,
        "parity": dict(parity),
        "exporter": exporter,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if checkpoint.adaptation is not None:
        # How the model was adapted to unlabelled images from where it is used (counts,
        # methods, weights, the AdaBN decision): the checkpoint's record as it is.
        document["adaptation"] = checkpoint.adaptation
    document.update(extra or {})
    # Fail here, not in the server: every value must survive a JSON round trip.
    return json.loads(json.dumps(document, allow_nan=False, default=_to_builtin))


def embed(model: onnx.ModelProto, document: Mapping[str, Any]) -> None:
    """Set one ``metadata_props`` entry per key, its value JSON-encoded."""
    del model.metadata_props[:]
    for key, value in document.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value, allow_nan=False)


def read_embedded(model: onnx.ModelProto) -> dict[str, Any]:
    """The inverse of ``embed``."""
    return {entry.key: json.loads(entry.value) for entry in model.metadata_props}


def to_json_bytes(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def _to_builtin(value: Any) -> Any:
    # Checkpoints may hold numpy or torch scalars in their summary fields.
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in model.json")
