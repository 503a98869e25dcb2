"""The Triton-layout model repository both halves read and write.

    REPO/<name>/config.pbtxt          Triton model configuration (text format)
    REPO/<name>/labels.txt            class names, output order
    REPO/<name>/<version>/model.onnx  numeric versions 1, 2, ... (no leading zero)
    REPO/<name>/<version>/model.json  export metadata (labels, preprocessing, provenance)

A version directory appears by an atomic rename of a ``.staging-*`` dot-directory, so readers
skip dot-directories and a version without ``model.onnx`` is incomplete.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILENAME = "config.pbtxt"
LABELS_FILENAME = "labels.txt"
MODEL_FILENAME = "model.onnx"
METADATA_FILENAME = "model.json"
STAGING_PREFIX = ".staging-"

_VERSION = re.compile(r"[1-9][0-9]*")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A model name becomes a directory and a Prometheus label; keep it a sane length.
MAX_MODEL_NAME_LENGTH = 128


class InvalidModelName(ValueError):  # noqa: N818 (names of the domain)
    """A model name that cannot be one directory of the repository."""


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is one path component of letters, digits, ``_``, ``.``, ``-``.

    Raises:
        InvalidModelName: naming the rule.
    """
    if len(name) > MAX_MODEL_NAME_LENGTH or not _MODEL_NAME.fullmatch(name):
        raise InvalidModelName(
            f"model name {name!r} is invalid: use letters, digits, '_', '.' and '-', "
            f"starting with a letter or digit, at most {MAX_MODEL_NAME_LENGTH} characters"
        )
    return name


def is_version_name(name: str) -> bool:
    """A version directory's name: an integer without a leading zero."""
    return bool(_VERSION.fullmatch(name))


def version_numbers(model_root: Path) -> list[int]:
    """Version directories under ``model_root`` (complete or not), ascending."""
    if not model_root.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_root.iterdir() if is_version_name(p.name) and p.is_dir()
    )
