"""Publishing into a Triton-layout model repository, atomically.

``REPO/<name>/<version>/`` is staged as ``REPO/<name>/.staging-<random>/`` (every file
fsynced), then renamed to the next integer version, so a polling server sees either no new
version or a complete one. Only then are ``config.pbtxt`` and ``labels.txt`` replaced, with the
same temp-file + fsync + ``os.replace`` pattern. In that order a server polling in between sees
the new version beside the previous model-level files, which it survives: the version's
``model.json`` carries its own labels, which servers prefer, and a ``config.pbtxt`` that does
not fit the new graph refuses it only until the new one lands (a change retries it). In the
other order a poll in between saw the versions already served with the new labels and
configuration: Triton (which reads ``labels.txt``, not ``model.json``) answered with the new
class names for the old graph, and an export failing between the two steps left it so. The
layout itself is unchanged, so older servers and Triton read it as before. A staging
directory left by a killed export is a dot-directory, which no reader treats as a version; the
next publish removes staging directories older than an hour (a live export stages for
seconds).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from contracts import repository_layout as layout
from contracts.atomic_files import (
    DEFAULT_FILE_MODE,
    atomic_write_bytes,
    fsync_directory,
    write_synced,
)
from contracts.graph_signature import INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME, UINT8_NHWC
from contracts.repository_layout import CONFIG_FILENAME, LABELS_FILENAME, STAGING_PREFIX
from trainer.errors import ConfigError

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_DELAY_US = 2000
STALE_STAGING_SECONDS = 3600.0
# Readable by a server or Triton running under another uid on a shared model volume.
VERSION_DIR_MODE = 0o755


def validate_model_name(name: str) -> str:
    """The repository's model-name rule (``contracts.repository_layout``) as a ``ConfigError``."""
    try:
        return layout.validate_model_name(name)
    except layout.InvalidModelName as exc:
        raise ConfigError(str(exc)) from None


def render_config(  # noqa: PLR0913  keyword-only fields of config.pbtxt
    model_name: str,
    *,
    input_format: str,
    input_size: Sequence[int],
    num_classes: int,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
) -> str:
    """Triton model configuration (protobuf text format) for the exported graph."""
    height, width = (int(v) for v in input_size)
    if input_format == UINT8_NHWC:
        data_type, layout, dims = "TYPE_UINT8", "FORMAT_NHWC", [height, width, 3]
    else:
        data_type, layout, dims = "TYPE_FP32", "FORMAT_NCHW", [3, height, width]
    return (
        f'name: "{model_name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        f"    data_type: {data_type}\n"
        f"    format: {layout}\n"
        f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{LOGITS_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {num_classes} ]\n"
        "  },\n"
        "  {\n"
        f'    name: "{PROBABILITIES_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {num_classes} ]\n"
        f'    label_filename: "{LABELS_FILENAME}"\n'
        "  }\n"
        "]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
    )


def render_labels(labels: Sequence[str]) -> str:
    """One class name per line, in output order."""
    for label in labels:
        if not label or "\n" in label or "\r" in label:
            raise ConfigError(f"class name {label!r} cannot be written as one line of labels.txt")
    return "".join(f"{label}\n" for label in labels)


def publish(
    repository: Path,
    model_name: str,
    *,
    version_files: Mapping[str, bytes],
    config_text: str,
    labels: Sequence[str],
) -> tuple[int, Path]:
    """Write ``version_files`` as the next version of ``model_name``; return (version, dir).

    On any failure before the version appears the staging directory is removed and nothing
    changes. A failure replacing ``labels.txt`` or ``config.pbtxt`` after it appeared raises
    with a note naming the published version (the next publish replaces both).
    """
    validate_model_name(model_name)
    labels_text = render_labels(labels).encode()
    model_root = Path(repository) / model_name
    for directory in (Path(repository), model_root):
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, VERSION_DIR_MODE)  # whatever the umask, readers can list it
    remove_stale_staging(model_root)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_root))
    try:
        os.chmod(staging, VERSION_DIR_MODE)  # mkdtemp makes it 0700
        for filename, data in version_files.items():
            _write_new_file(staging / filename, data)
        fsync_directory(staging)
        version, target = _rename_to_next_version(staging, model_root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(model_root)
    try:
        atomic_write_bytes(model_root / LABELS_FILENAME, labels_text)
        atomic_write_bytes(model_root / CONFIG_FILENAME, config_text.encode())
    except OSError as error:
        error.add_note(
            f"version {version} is published at {target}; {LABELS_FILENAME} and "
            f"{CONFIG_FILENAME} of {model_root} may still be the previous ones"
        )
        raise
    return version, target


def remove_stale_staging(model_root: Path, older_than_s: float = STALE_STAGING_SECONDS) -> None:
    """Delete staging directories left by killed exports (not touched for ``older_than_s``)."""
    now = time.time()
    for path in model_root.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)


def _rename_to_next_version(staging: Path, model_root: Path) -> tuple[int, Path]:
    # Two exports may race for the same number: rename() onto a non-empty directory fails,
    # and the loser takes the next one.
    for _ in range(100):
        versions = layout.version_numbers(model_root)
        version = (versions[-1] if versions else 0) + 1
        target = model_root / str(version)
        try:
            os.rename(staging, target)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        return version, target
    raise RuntimeError(f"could not claim a version number under {model_root}")


def _write_new_file(path: Path, data: bytes) -> None:
    if not path.parent.is_dir():  # a file of a version subdirectory (golden/)
        path.parent.mkdir(parents=True)
        os.chmod(path.parent, VERSION_DIR_MODE)
    with open(path, "xb") as handle:
        os.fchmod(handle.fileno(), DEFAULT_FILE_MODE)
        write_synced(handle, data)
