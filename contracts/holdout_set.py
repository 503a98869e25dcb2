"""The holdout set a model version carries: reviewed production images and their true classes.

    REPO/<name>/<version>/holdout/holdout.json   this document
    REPO/<name>/<version>/holdout/<file>         the encoded images, byte-for-byte

Images from where the model is used, labelled by a person (``trainer ingest --split holdout``)
and never trained on or used to choose a model. The export copies ``DATA/holdout/<class>/``
into the version; the server's rollout gate runs the new version and the one it would replace
on them and refuses the new one when it does worse (``server.golden_set.check_holdout``). The
golden set, chosen from val, says whether the serving path computes what the trainer did; this
set says whether the new model is better where it is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.json_files import UnreadableJson, read_json_object

HOLDOUT_DIRNAME = "holdout"
HOLDOUT_FILENAME = "holdout.json"
HOLDOUT_FORMAT = "finetune-holdout-set/1"
# Bounds of what the export writes and the server reads: enough images for an accuracy to
# within a few points, each the size of a photograph, and a document to list them.
MAX_HOLDOUT_IMAGES = 512
MAX_HOLDOUT_IMAGE_BYTES = 8 << 20
MAX_HOLDOUT_DOCUMENT_BYTES = 1 << 20


class InvalidHoldoutSet(ValueError):  # noqa: N818 (names of the domain)
    """A holdout set that cannot be read or is over its bounds."""


@dataclass(frozen=True)
class HoldoutImage:
    """One encoded image and the class a person gave it (an index into the set's labels)."""

    file: str
    true_label: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "true_label": self.true_label}


@dataclass(frozen=True)
class HoldoutSet:
    """The class names and the images."""

    labels: tuple[str, ...]
    images: tuple[HoldoutImage, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": HOLDOUT_FORMAT,
            "labels": list(self.labels),
            "images": [image.to_dict() for image in self.images],
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> HoldoutSet:
        """Read what ``to_dict`` writes.

        Raises:
            InvalidHoldoutSet: naming what is missing, malformed or over the bounds.
        """
        if document.get("format") != HOLDOUT_FORMAT:
            raise InvalidHoldoutSet(
                f"holdout set format {document.get('format')!r}, expected {HOLDOUT_FORMAT!r}"
            )
        labels, images = document.get("labels"), document.get("images")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InvalidHoldoutSet("holdout set labels must be a list of class names")
        if not isinstance(images, list):
            raise InvalidHoldoutSet("holdout set images must be a list")
        if len(images) > MAX_HOLDOUT_IMAGES:
            raise InvalidHoldoutSet(
                f"holdout set lists {len(images)} images, more than {MAX_HOLDOUT_IMAGES}"
            )
        return cls(tuple(labels), tuple(_image(entry, len(labels)) for entry in images))


def _image(entry: Any, classes: int) -> HoldoutImage:
    if not isinstance(entry, Mapping):
        raise InvalidHoldoutSet("each holdout image must be an object")
    file, label = entry.get("file"), entry.get("true_label")
    if not isinstance(file, str) or not file or "/" in file or file.startswith("."):
        raise InvalidHoldoutSet(f"holdout image file name {file!r} must be a plain file name")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < classes:
        raise InvalidHoldoutSet(f"{file}: true_label {label!r} is not a class index")
    return HoldoutImage(file, label)


def read_holdout_set(version_dir: Path) -> tuple[HoldoutSet, list[bytes]] | None:
    """The holdout set of a version directory and its images' bytes; None when it has none.

    Raises:
        InvalidHoldoutSet: the document or an image cannot be read, or is over the bounds.
    """
    directory = Path(version_dir) / HOLDOUT_DIRNAME
    path = directory / HOLDOUT_FILENAME
    if not path.is_file():
        return None
    try:
        document = read_json_object(path, max_bytes=MAX_HOLDOUT_DOCUMENT_BYTES)
    except UnreadableJson as error:
        raise InvalidHoldoutSet(f"{path}: {error}") from None
    holdout = HoldoutSet.from_dict(document)
    data = []
    for image in holdout.images:
        file = directory / image.file
        try:
            size = file.stat().st_size
            if size > MAX_HOLDOUT_IMAGE_BYTES:
                raise InvalidHoldoutSet(
                    f"{file}: {size} bytes, more than {MAX_HOLDOUT_IMAGE_BYTES}"
                )
            data.append(file.read_bytes())
        except OSError as error:
            raise InvalidHoldoutSet(f"{file}: {error.strerror or error}") from None
    return holdout, data
