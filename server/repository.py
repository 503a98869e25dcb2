"""Reading a Triton-layout model repository.

    REPO/<name>/config.pbtxt          Triton model configuration (text format)
    REPO/<name>/labels.txt            class names, output order
    REPO/<name>/<version>/model.onnx  numeric versions 1, 2, ...
    REPO/<name>/<version>/model.json  export metadata (labels, preprocessing, provenance)

Non-numeric directories, dot-directories and names starting with ``0`` are not versions. A
version directory appears by an atomic rename, so a version without ``model.onnx`` is skipped
as incomplete.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from server._proto.inference import model_config_pb2
from server.errors import ModelLoadError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
METADATA_FILE = "model.json"
INPUT_FORMATS = ("uint8-nhwc", "float32-nchw")


@dataclass(frozen=True)
class Preprocessing:
    """How the classification service turns an encoded image into the model's input."""

    input_format: str
    input_size: tuple[int, int]
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class ExportMetadata:
    """The parts of model.json the server uses, plus the whole document for reporting."""

    labels: tuple[str, ...]
    preprocessing: Preprocessing | None
    precision: str | None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionSource:
    """One version directory on disk."""

    model_name: str
    version: int
    directory: Path

    @property
    def onnx_path(self) -> Path:
        return self.directory / MODEL_FILE


@dataclass(frozen=True)
class ModelSource:
    """A model directory: its parsed configuration, labels and the versions its policy selects."""

    name: str
    directory: Path
    config: model_config_pb2.ModelConfig
    labels: tuple[str, ...]
    # Selected by the version policy.
    versions: tuple[VersionSource, ...]
    # Every complete version on disk, oldest first.
    available: tuple[VersionSource, ...] = ()


def is_version_dir(path: Path) -> bool:
    """A numeric directory name not starting with 0 that holds a model.onnx."""
    name = path.name
    return path.is_dir() and name.isdigit() and not name.startswith("0")


def list_models(repository: Path) -> list[str]:
    """Model names in the repository: directories holding a config.pbtxt, sorted."""
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} is not a directory")
    return sorted(
        p.name
        for p in repository.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).is_file()
    )


def read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt; the model name defaults to the directory's name, as in Triton."""
    path = model_dir / CONFIG_FILE
    try:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except OSError as error:
        raise ModelLoadError(f"{path}: {error.strerror}") from None
    except text_format.ParseError as error:
        raise ModelLoadError(f"{path}: {error}") from None
    if not config.name:
        config.name = model_dir.name
    elif config.name != model_dir.name:
        raise ModelLoadError(
            f"{path}: name {config.name!r} differs from its directory {model_dir.name!r}"
        )
    if config.platform and config.platform != "onnxruntime_onnx":
        raise ModelLoadError(f"{path}: platform {config.platform!r} is not onnxruntime_onnx")
    if config.backend and config.backend != "onnxruntime":
        raise ModelLoadError(f"{path}: backend {config.backend!r} is not onnxruntime")
    return config


def read_labels(model_dir: Path, config: model_config_pb2.ModelConfig) -> tuple[str, ...]:
    """Labels from the file named by an output's label_filename (or labels.txt), if any."""
    names = [o.label_filename for o in config.output if o.label_filename] or ["labels.txt"]
    path = model_dir / names[0]
    if not path.is_file():
        return ()
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def select_versions(config: model_config_pb2.ModelConfig, available: list[int]) -> list[int]:
    """Apply the version policy (default: the latest one) to the versions on disk."""
    available = sorted(available)
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    count = policy.latest.num_versions if choice == "latest" else 1
    return available[-max(count, 1) :]


def read_model(repository: Path, name: str) -> ModelSource:
    """Read one model directory and the versions its policy selects."""
    model_dir = repository / name
    config = read_config(model_dir)
    available = [
        int(p.name) for p in model_dir.iterdir() if is_version_dir(p) and (p / MODEL_FILE).is_file()
    ]
    selected = select_versions(config, available)
    return ModelSource(
        name=name,
        directory=model_dir,
        config=config,
        labels=read_labels(model_dir, config),
        versions=tuple(VersionSource(name, v, model_dir / str(v)) for v in selected),
        available=tuple(VersionSource(name, v, model_dir / str(v)) for v in sorted(available)),
    )


def _floats(value: Any, key: str, count: int) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != count:
        raise ModelLoadError(f"model.json: {key} must be a list of {count} numbers")
    return tuple(float(v) for v in value)


def parse_metadata(document: dict[str, Any], source: str) -> ExportMetadata:
    """Validate the export metadata document (model.json or the ONNX metadata_props)."""
    labels = document.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ModelLoadError(f"{source}: labels must be a list of strings")
    preprocessing = None
    if "input_size" in document:
        input_format = document.get("input_format", "uint8-nhwc")
        if input_format not in INPUT_FORMATS:
            raise ModelLoadError(f"{source}: input_format {input_format!r} not in {INPUT_FORMATS}")
        size = _floats(document["input_size"], "input_size", 2)
        resize = int(document.get("resize_size", max(size)))
        preprocessing = Preprocessing(
            input_format=input_format,
            input_size=(int(size[0]), int(size[1])),
            resize_size=resize,
            mean=_floats(document.get("mean", [0.485, 0.456, 0.406]), "mean", 3),  # type: ignore[arg-type]
            std=_floats(document.get("std", [0.229, 0.224, 0.225]), "std", 3),  # type: ignore[arg-type]
        )
    return ExportMetadata(
        labels=tuple(labels),
        preprocessing=preprocessing,
        precision=document.get("precision"),
        raw=document,
    )


def read_metadata(version: VersionSource, onnx_metadata: dict[str, str]) -> ExportMetadata | None:
    """model.json if present, else the same keys from the ONNX metadata_props, else None."""
    path = version.directory / METADATA_FILE
    if path.is_file():
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"{path}: {error}") from None
        if not isinstance(document, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return parse_metadata(document, str(path))
    if "input_size" in onnx_metadata or "labels" in onnx_metadata:
        document = {}
        for key, value in onnx_metadata.items():
            try:
                document[key] = json.loads(value)
            except json.JSONDecodeError:
                document[key] = value
        return parse_metadata(document, f"{version.onnx_path} metadata_props")
    return None
