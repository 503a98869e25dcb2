"""The files a captured image leaves for review: the image and its JSON sidecar.

    CAPTURE_DIR/unlabeled/<predicted label>/<name>.<ext>        the image as it arrived
    CAPTURE_DIR/unlabeled/<predicted label>/<name>.<ext>.json   its sidecar, this record

The server writes them (``server.capture``); ``trainer ingest`` moves a labelled image into
the training set, records its sidecar in the ledger as provenance and deletes both. The
sidecar's name is the image's file name plus ``.json`` (``sidecar_path``), so a labelling tool
that lists images by extension never mistakes one for an image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.json_files import UnreadableJson, read_json_object

#: The folder under the capture directory that holds the captures, by predicted label.
UNLABELED_DIRNAME = "unlabeled"
SIDECAR_SUFFIX = ".json"
#: The largest sidecar read: the probabilities of tens of thousands of classes fit.
MAX_SIDECAR_BYTES = 4 * 2**20
_KNOWN = (
    "model",
    "version",
    "probabilities",
    "request_id",
    "reason",
    "received_at",
    "reencoded_from_bytes",
)


class InvalidCaptureSidecar(ValueError):  # noqa: N818 (names of the domain)
    """A sidecar that cannot be read; the message names the key and the problem."""


def sidecar_path(image_path: Path) -> Path:
    """The sidecar of a captured image: its file name plus ``.json``."""
    image_path = Path(image_path)
    return image_path.with_name(image_path.name + SIDECAR_SUFFIX)


@dataclass(frozen=True)
class CaptureRecord:
    """What the server knew about a captured image when it answered.

    Attributes:
        model, version: the model version that answered.
        probabilities: its probability for each class, by label.
        request_id: the request's id (empty when the client gave none).
        reason: why it was captured (``abstained``, ``low_margin``, ``random``).
        received_at: when the request arrived (seconds since the epoch).
        reencoded_from_bytes: the size of the image as sent, when the stored image is a
            smaller re-encoded copy; None when it is stored as it arrived.
        other: keys this reader does not know, kept as they are.
    """

    model: str
    version: str
    probabilities: Mapping[str, float]
    request_id: str | None = None
    reason: str | None = None
    received_at: float | None = None
    reencoded_from_bytes: int | None = None
    other: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's keys; the optional ones only when set."""
        document: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "probabilities": dict(self.probabilities),
        }
        for key in ("request_id", "reason", "received_at", "reencoded_from_bytes"):
            if getattr(self, key) is not None:
                document[key] = getattr(self, key)
        return {**document, **self.other}

    def to_json_bytes(self) -> bytes:
        """The sidecar file's bytes (keys sorted)."""
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> CaptureRecord:
        """Read what ``to_dict`` writes.

        Raises:
            InvalidCaptureSidecar: naming the key and the problem.
        """
        for key in ("model", "version"):
            if not isinstance(document.get(key), str):
                raise InvalidCaptureSidecar(f"{key} must be a string")
        probabilities = document.get("probabilities")
        if not isinstance(probabilities, Mapping) or not all(
            isinstance(label, str) and _is_number(p) for label, p in probabilities.items()
        ):
            raise InvalidCaptureSidecar("probabilities must map labels to numbers")
        for key in ("request_id", "reason"):
            if document.get(key) is not None and not isinstance(document[key], str):
                raise InvalidCaptureSidecar(f"{key} must be a string")
        received_at = document.get("received_at")
        if received_at is not None and not _is_number(received_at):
            raise InvalidCaptureSidecar("received_at must be a number (seconds since the epoch)")
        original = document.get("reencoded_from_bytes")
        if original is not None and (
            isinstance(original, bool) or not isinstance(original, int) or original < 0
        ):
            raise InvalidCaptureSidecar("reencoded_from_bytes must be a whole number >= 0")
        return cls(
            model=document["model"],
            version=document["version"],
            probabilities={label: float(p) for label, p in probabilities.items()},
            request_id=document.get("request_id"),
            reason=document.get("reason"),
            received_at=None if received_at is None else float(received_at),
            reencoded_from_bytes=original,
            other={key: value for key, value in document.items() if key not in _KNOWN},
        )


def read_sidecar(image_path: Path) -> CaptureRecord:
    """The sidecar of the captured image ``image_path`` (at most ``MAX_SIDECAR_BYTES``).

    Raises:
        InvalidCaptureSidecar: missing, unreadable, too large or malformed; the message names
            the file.
    """
    path = sidecar_path(image_path)
    try:
        return CaptureRecord.from_dict(read_json_object(path, max_bytes=MAX_SIDECAR_BYTES))
    except (UnreadableJson, InvalidCaptureSidecar) as error:
        raise InvalidCaptureSidecar(f"{path}: {error}") from None


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
