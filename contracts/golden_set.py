"""The golden set a model version carries: encoded images and what the trainer computed.

    REPO/<name>/<version>/golden/golden.json   this document
    REPO/<name>/<version>/golden/<file>        the encoded images, byte-for-byte

The export writes it from val images exactly as they are on disk (plus one with an EXIF
rotation), with the top-1 class and the probabilities the trainer's eval path computed. The
server runs the images through its own decode -> resize -> crop -> model path when it loads
the version and refuses the version when they disagree; ``client verify`` runs the same
comparison through a live server. Both use ``compare`` below, so the verdict is one rule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GOLDEN_DIRNAME = "golden"
GOLDEN_FILENAME = "golden.json"
GOLDEN_FORMAT = "finetune-golden-set/1"


class InvalidGoldenSet(ValueError):  # noqa: N818 (names of the domain)
    """A golden set that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class GoldenImage:
    """One encoded image and the trainer's answer for it.

    Attributes:
        file: the file name inside ``golden/``.
        top1: the class index the trainer's eval path predicted.
        probabilities: its probability for every class, in output order.
        source: where the image came from (relative to the data directory, or ``generated``).
        true_label: the class folder it was found in (information only).
    """

    file: str
    top1: int
    probabilities: tuple[float, ...]
    source: str = ""
    true_label: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "top1": self.top1,
            "probabilities": list(self.probabilities),
            "source": self.source,
            "true_label": self.true_label,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> GoldenImage:
        file = document["file"]
        if not isinstance(file, str) or not file or "/" in file or file.startswith("."):
            raise InvalidGoldenSet(f"golden image file name {file!r} must be a plain file name")
        probabilities = tuple(float(p) for p in document["probabilities"])
        top1 = int(document["top1"])
        if not 0 <= top1 < len(probabilities):
            raise InvalidGoldenSet(f"{file}: top1 {top1} is not a class index")
        true_label = document.get("true_label")
        return cls(
            file=file,
            top1=top1,
            probabilities=probabilities,
            source=str(document.get("source", "")),
            true_label=None if true_label is None else int(true_label),
        )


@dataclass(frozen=True)
class GoldenSet:
    """The images, the class names and the tolerance the export measured and recorded.

    Attributes:
        tolerance: largest absolute difference of any probability that still passes.
        measured_max_abs_diff: the largest difference the export measured between the
            trainer's eval path and a Pillow decode/resize into the exported graph.
    """

    labels: tuple[str, ...]
    images: tuple[GoldenImage, ...]
    tolerance: float
    measured_max_abs_diff: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": GOLDEN_FORMAT,
            "labels": list(self.labels),
            "tolerance": self.tolerance,
            "measured_max_abs_diff": self.measured_max_abs_diff,
            "images": [image.to_dict() for image in self.images],
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> GoldenSet:
        """Read what ``to_dict`` writes.

        Raises:
            InvalidGoldenSet: naming what is missing or malformed.
        """
        if document.get("format") != GOLDEN_FORMAT:
            raise InvalidGoldenSet(
                f"golden set format {document.get('format')!r}, expected {GOLDEN_FORMAT!r}"
            )
        try:
            labels = tuple(str(label) for label in document["labels"])
            images = tuple(GoldenImage.from_dict(image) for image in document["images"])
            tolerance = float(document["tolerance"])
            measured = float(document.get("measured_max_abs_diff", 0.0))
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidGoldenSet(f"golden set is malformed: {error!r}") from None
        if not math.isfinite(tolerance) or tolerance < 0:
            raise InvalidGoldenSet(f"golden set tolerance {tolerance} must be >= 0")
        for image in images:
            if len(image.probabilities) != len(labels):
                raise InvalidGoldenSet(
                    f"{image.file}: {len(image.probabilities)} probabilities for "
                    f"{len(labels)} classes"
                )
        return cls(labels, images, tolerance, measured)


@dataclass(frozen=True)
class GoldenVerdict:
    """The outcome of a golden-set check: ``problems`` is empty when the version passes."""

    images: int
    tolerance: float
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if self.passed:
            return f"golden set passed ({self.images} images, tolerance {self.tolerance:g})"
        shown = "; ".join(self.problems[:5])
        more = f" (and {len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        return f"golden set failed on {len(self.problems)} of {self.images} images: {shown}{more}"


def golden_dir(version_dir: Path) -> Path:
    """Where a version keeps its golden set."""
    return Path(version_dir) / GOLDEN_DIRNAME


def read_golden_set(version_dir: Path) -> tuple[GoldenSet, list[bytes]] | None:
    """The golden set of a version directory and its images' bytes; None when it has none.

    Raises:
        InvalidGoldenSet: the document or an image cannot be read.
    """
    directory = golden_dir(version_dir)
    path = directory / GOLDEN_FILENAME
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidGoldenSet(f"{path}: {error}") from None
    if not isinstance(document, dict):
        raise InvalidGoldenSet(f"{path}: expected a JSON object")
    golden = GoldenSet.from_dict(document)
    try:
        data = [(directory / image.file).read_bytes() for image in golden.images]
    except OSError as error:
        raise InvalidGoldenSet(f"{path}: {error}") from None
    return golden, data


def compare(golden: GoldenSet, actual: Sequence[Sequence[float]]) -> list[str]:
    """Every disagreement between the golden set and the probabilities a path computed.

    ``actual`` holds one row of probabilities per golden image, in the set's order. An image
    disagrees when its top-1 class differs or any probability differs by more than the set's
    tolerance. Returns one line per disagreeing image (empty: the path passes).
    """
    if len(actual) != len(golden.images):
        return [f"{len(actual)} results for {len(golden.images)} golden images"]
    problems = []
    for image, row in zip(golden.images, actual, strict=True):
        problem = _disagreement(golden, image, [float(p) for p in row])
        if problem:
            problems.append(f"{image.file}: {problem}")
    return problems


def _disagreement(golden: GoldenSet, image: GoldenImage, row: list[float]) -> str:
    if len(row) != len(image.probabilities):
        return f"{len(row)} probabilities, expected {len(image.probabilities)}"
    top1 = max(range(len(row)), key=row.__getitem__)
    if top1 != image.top1:
        return (
            f"top-1 {_name(golden, top1)} ({row[top1]:.4f}), expected "
            f"{_name(golden, image.top1)} ({image.probabilities[image.top1]:.4f})"
        )
    worst = max(range(len(row)), key=lambda i: abs(row[i] - image.probabilities[i]))
    difference = abs(row[worst] - image.probabilities[worst])
    if not difference <= golden.tolerance:
        return (
            f"probability of {_name(golden, worst)} {row[worst]:.4f}, expected "
            f"{image.probabilities[worst]:.4f} (differs by {difference:.4f}, tolerance "
            f"{golden.tolerance:.4f})"
        )
    return ""


def _name(golden: GoldenSet, index: int) -> str:
    label = golden.labels[index] if index < len(golden.labels) else str(index)
    return repr(label)


def labelled_accuracy(
    golden: GoldenSet, predicted_labels: Sequence[str]
) -> tuple[float, int] | None:
    """Share of the set's images with a known true class whose predicted class name matches.

    ``predicted_labels`` holds one class name per golden image, in the set's order. Names, not
    indices, are compared, so a model with more or reordered classes is judged fairly.
    Returns (accuracy, images counted), or None when no image has a true class.
    """
    pairs = [
        (golden.labels[image.true_label], predicted)
        for image, predicted in zip(golden.images, predicted_labels, strict=True)
        if image.true_label is not None and image.true_label < len(golden.labels)
    ]
    if not pairs:
        return None
    return sum(truth == predicted for truth, predicted in pairs) / len(pairs), len(pairs)
