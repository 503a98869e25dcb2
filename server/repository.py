"""Reading a Triton-layout model repository.

    REPO/<name>/config.pbtxt          Triton model configuration (text format)
    REPO/<name>/labels.txt            class names, output order
    REPO/<name>/<version>/model.onnx  numeric versions 1, 2, ...
    REPO/<name>/<version>/model.json  export metadata (``contracts.model_metadata``)

The file names and the version rule are ``contracts.repository_layout``'s, shared with the
exporter that writes the repository. Non-numeric directories, dot-directories and names
starting with ``0`` are not versions. A version directory appears by an atomic rename, so a
version without ``model.onnx`` is skipped as incomplete. ``config.pbtxt`` becomes a plain
``ModelSpec``; nothing past this module sees its protobuf.

The repository may also be one model's directory itself (``REPO/config.pbtxt``,
``REPO/<version>/``): KServe puts the directory a storageUri names at /mnt/models. It then holds
one model, named by the server's ``--model-name``, which takes the place of the directory's name
in Triton's name rule.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contracts.model_metadata import (
    InvalidModelMetadata,
    ModelMetadata,
    metadata_from_props,
    read_model_metadata,
)
from contracts.repository_layout import (
    CONFIG_FILENAME,
    LABELS_FILENAME,
    METADATA_FILENAME,
    MODEL_FILENAME,
    is_version_name,
)
from server.errors import ModelLoadError
from server.model_spec import ModelSpec

log = logging.getLogger(__name__)

# config.pbtxt is protobuf text: the transport owns that parser, and the composition root hands
# it in, so this module stays free of *_pb2. It raises ValueError for text it cannot read.
ConfigParser = Callable[[str], ModelSpec]

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"


@dataclass(frozen=True)
class VersionSource:
    """One version directory on disk."""

    model_name: str
    version: int
    directory: Path

    @property
    def onnx_path(self) -> Path:
        return self.directory / MODEL_FILENAME


@dataclass(frozen=True)
class ModelSource:
    """A model directory: its parsed configuration, labels and the versions its policy selects."""

    name: str
    directory: Path
    spec: ModelSpec
    labels: tuple[str, ...]
    # Selected by the version policy.
    versions: tuple[VersionSource, ...]
    # Every complete version on disk, oldest first.
    available: tuple[VersionSource, ...] = ()
    # model_fingerprint() when it was read (taken before reading, so a write during the read
    # shows up as a change at the next poll).
    fingerprint: tuple = ()


def is_version_dir(path: Path) -> bool:
    """A directory named like a version (a number without a leading zero)."""
    return is_version_name(path.name) and path.is_dir()


def is_single_model(repository: Path) -> bool:
    """Whether ``repository`` is itself one model's directory (it holds config.pbtxt)."""
    return (repository / CONFIG_FILENAME).is_file()


def list_models(repository: Path, single_model_name: str = "") -> list[str]:
    """Model names in the repository: directories holding a config.pbtxt, sorted; or
    ``[single_model_name]`` (``--model-name``) when the repository is one model's directory.

    Raises:
        ModelLoadError: not a readable directory, or one model's directory with no name given.
    """
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} is not a directory")
    if is_single_model(repository):
        if not single_model_name:
            raise ModelLoadError(
                f"model repository {repository} is one model's directory (it holds "
                f"{CONFIG_FILENAME}): name the model with --model-name"
            )
        return [single_model_name]
    try:
        entries = list(repository.iterdir())
    except OSError as error:
        raise ModelLoadError(f"model repository {repository}: {error.strerror}") from None
    return sorted(
        p.name
        for p in entries
        if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILENAME).is_file()
    )


def read_config(model_dir: Path, parse: ConfigParser, served_as: str = "") -> ModelSpec:
    """Parse config.pbtxt; the model name defaults to the directory's name, as in Triton, or
    to ``served_as`` (``--model-name``) for a repository that is one model's directory."""
    path = model_dir / CONFIG_FILENAME
    try:
        text = path.read_text()
    except OSError as error:
        raise ModelLoadError(f"{path}: {error.strerror}") from None
    if not states_anything(text):
        # Triton would auto-complete it; here only a directory with config.pbtxt is a model,
        # so an empty one is more likely a truncated write than a request to guess the batching.
        raise ModelLoadError(
            f"{path}: empty; state at least max_batch_size, input and output "
            "(trainer export writes them)"
        )
    try:
        spec = parse(text)
    except ValueError as error:
        raise ModelLoadError(f"{path}: {error}") from None
    expected = served_as or model_dir.name
    if not spec.name:
        spec = dataclasses.replace(spec, name=expected)
    elif spec.name != expected:
        where = f"--model-name {expected!r}" if served_as else f"its directory {expected!r}"
        raise ModelLoadError(f"{path}: name {spec.name!r} differs from {where}")
    if spec.platform and spec.platform != PLATFORM:
        raise ModelLoadError(f"{path}: platform {spec.platform!r} is not {PLATFORM}")
    if spec.backend and spec.backend != BACKEND:
        raise ModelLoadError(f"{path}: backend {spec.backend!r} is not {BACKEND}")
    return spec


def states_anything(text: str) -> bool:
    """Whether config.pbtxt text holds anything but blank lines and ``#`` comments."""
    return any(line.partition("#")[0].strip() for line in text.splitlines())


def label_path(model_dir: Path, spec: ModelSpec) -> Path:
    """The label file an output's label_filename names (or labels.txt), inside ``model_dir``.

    Raises:
        ModelLoadError: the name resolves outside the model directory (``../``, an absolute
            path, or a symbolic link leading out), or cannot be resolved (a symbolic link loop).
    """
    name = (spec.label_filenames or (LABELS_FILENAME,))[0]
    path = model_dir / name
    try:
        # A loop raises RuntimeError up to Python 3.12, OSError (ELOOP) from 3.13.
        resolved, directory = path.resolve(), model_dir.resolve()
    except (OSError, RuntimeError) as error:
        raise ModelLoadError(f"{path}: cannot be resolved: {error}") from None
    if not resolved.is_relative_to(directory):
        raise ModelLoadError(
            f"{model_dir / CONFIG_FILENAME}: label_filename {name!r} resolves outside the model "
            "directory"
        )
    return path


def read_labels(model_dir: Path, spec: ModelSpec) -> tuple[str, ...]:
    """Labels from the file named by an output's label_filename (or labels.txt), if any."""
    path = label_path(model_dir, spec)
    if not path.is_file():
        return ()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path}: cannot read labels: {error}") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _stat(path: Path) -> tuple[str, int, int]:
    try:
        info = path.stat()
    except OSError:
        return (path.name, -1, -1)
    return (path.name, info.st_mtime_ns, info.st_size)


def model_fingerprint(model_dir: Path, spec: ModelSpec | None) -> tuple:
    """What the model directory's own files look like now: config.pbtxt and the label file.

    A change reloads every loaded version of the model.
    """
    files = [model_dir / CONFIG_FILENAME, model_dir / LABELS_FILENAME]
    if spec is not None and spec.label_filenames:
        files.append(model_dir / spec.label_filenames[0])
    return tuple(_stat(path) for path in files)


def version_fingerprint(source: VersionSource) -> tuple:
    """Every file of a version directory (one level), so any change re-examines a rejection."""
    try:
        paths = sorted(p for p in source.directory.iterdir() if p.is_file())
    except OSError:
        return ()
    return tuple(_stat(path) for path in paths)


def read_model(repository: Path, name: str, parse: ConfigParser) -> ModelSource:
    """Read one model directory and the versions its policy selects."""
    single = is_single_model(repository)
    model_dir = repository if single else repository / name
    fingerprint = model_fingerprint(model_dir, None)
    spec = read_config(model_dir, parse, name if single else "")
    available = [
        int(p.name)
        for p in model_dir.iterdir()
        if is_version_dir(p) and (p / MODEL_FILENAME).is_file()
    ]
    selected = spec.version_policy.select(available)
    return ModelSource(
        name=name,
        directory=model_dir,
        spec=spec,
        labels=read_labels(model_dir, spec),
        versions=tuple(VersionSource(name, v, model_dir / str(v)) for v in selected),
        available=tuple(VersionSource(name, v, model_dir / str(v)) for v in sorted(available)),
        fingerprint=fingerprint + model_fingerprint(model_dir, spec)[2:],
    )


def read_metadata(version: VersionSource, onnx_metadata: dict[str, str]) -> ModelMetadata | None:
    """model.json if present, else the same keys from the ONNX metadata_props, else None.

    Raises:
        ModelLoadError: the document cannot be read or a key is malformed (named).
    """
    path = version.directory / METADATA_FILENAME
    if path.is_file():
        try:
            return read_model_metadata(path)
        except InvalidModelMetadata as error:  # it names the file
            raise ModelLoadError(str(error)) from None
    try:
        return metadata_from_props(onnx_metadata)
    except InvalidModelMetadata as error:
        raise ModelLoadError(f"{version.onnx_path} metadata_props: {error}") from None
