"""The load-time check of a version's golden set through the server's own image path.

Each golden image goes through exactly what a Classify request's image goes through
(``server.preprocess.decode_image`` with the version's ``model.json``, then the graph), and
the probabilities are compared with what the trainer computed (``contracts.golden_set``). A
version whose preprocessing facts, graph or decoder disagree with the trainer's is refused
before it serves.

The rollout gate's comparisons live here too, as they run the same path: a new version
against the version it would replace, on that version's golden set (``check_rollout``) and on
the new version's holdout set of reviewed production images (``check_holdout``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contracts.golden_set import (
    GoldenVerdict,
    InvalidGoldenSet,
    compare,
    labelled_accuracy,
    read_golden_set,
)
from contracts.holdout_set import read_holdout_set
from contracts.model_metadata import ModelMetadata
from server.class_scores import class_probabilities
from server.errors import InvalidInput
from server.onnx_sessions import OnnxSessions
from server.preprocess import ImageLimits, decode_image

log = logging.getLogger(__name__)

# Called between golden images; raises to stop the check (a load cancelled at shutdown).
Checkpoint = Callable[[], None]


def _never_stop() -> None:
    return None


#: The golden set is checked for its numbers, not its size: the export chose its images within
#: the trainer's own budget, and an operator's narrower request limits must not refuse a model.
GOLDEN_LIMITS = ImageLimits(max_bytes=64 * 2**20, max_pixels=100_000_000, max_aspect=64.0)


def check_golden_set(
    version_dir: Path,
    metadata: ModelMetadata | None,
    sessions: OnnxSessions,
    limits: ImageLimits = GOLDEN_LIMITS,
    checkpoint: Checkpoint = _never_stop,
) -> GoldenVerdict | None:
    """Run the version's golden set through the server's path; None when it has none.

    Args:
        checkpoint: called between images; what it raises stops the check.

    Raises:
        InvalidGoldenSet: the golden set cannot be read or does not fit the model.
    """
    found = read_golden_set(version_dir)
    if found is None:
        return None
    golden, images = found
    files = [image.file for image in golden.images]
    rows, problems = _served_probabilities(
        files, images, len(golden.labels), JudgedVersion(metadata, sessions), limits, checkpoint
    )
    if not problems:
        problems = compare(golden, [row.tolist() for row in rows])
    return GoldenVerdict(len(images), golden.tolerance, tuple(problems))


ON_PREVIOUS_GOLDEN_SET = "the previous version's golden set"
ON_HOLDOUT_SET = "its holdout set of reviewed production images"


@dataclass(frozen=True)
class RolloutVerdict:
    """A new version against the version it would replace, on one labelled set."""

    baseline_accuracy: float
    accuracy: float
    images: int
    max_drop: float
    judged_on: str = ON_PREVIOUS_GOLDEN_SET

    @property
    def passed(self) -> bool:
        return self.accuracy >= self.baseline_accuracy - self.max_drop - 1e-9

    def describe(self) -> str:
        verdict = "passed" if self.passed else "failed"
        return (
            f"rollout check {verdict}: accuracy {self.accuracy:.3f} on {self.judged_on} "
            f"({self.images} labelled images) against the previous version's "
            f"{self.baseline_accuracy:.3f}, allowed drop {self.max_drop:.3f}"
        )


@dataclass(frozen=True)
class JudgedVersion:
    """What runs an image through one version: its ``model.json``, its sessions, and the class
    names its outputs stand for."""

    metadata: ModelMetadata | None
    sessions: OnnxSessions
    labels: tuple[str, ...] = ()


def check_rollout(  # noqa: PLR0913  the check's inputs, and where it may be stopped
    baseline_dir: Path,
    metadata: ModelMetadata | None,
    sessions: OnnxSessions,
    labels: tuple[str, ...],
    max_drop: float,
    checkpoint: Checkpoint = _never_stop,
) -> RolloutVerdict | None:
    """How a new version does on the images the previous version's golden set holds.

    A retrain must not silently break the classes the previous version got right: its
    accuracy there (true classes from the val folders, predicted through the new version's
    own decode and graph) may fall at most ``max_drop`` below the previous version's own.
    None when the previous version has no golden set or no labelled images in it.

    Raises:
        InvalidGoldenSet: the previous version's golden set cannot be read.
    """
    found = read_golden_set(baseline_dir)
    if found is None:
        return None
    golden, images = found
    baseline = labelled_accuracy(golden, [golden.labels[image.top1] for image in golden.images])
    if baseline is None:
        return None
    files = [image.file for image in golden.images]
    version = JudgedVersion(metadata, sessions, labels)
    predicted = _predicted_labels(files, images, version, checkpoint)
    accuracy = labelled_accuracy(golden, predicted)
    assert accuracy is not None  # same images, same true classes as the baseline
    return RolloutVerdict(baseline[0], accuracy[0], baseline[1], max_drop)


def check_holdout(
    version_dir: Path,
    candidate: JudgedVersion,
    baseline: JudgedVersion,
    max_drop: float,
    checkpoint: Checkpoint = _never_stop,
) -> RolloutVerdict | None:
    """How a new version and the one it would replace do on the new version's holdout set.

    Both versions see every image through their own decode and graph; class names, not
    indices, are compared with the true ones. None when the new version carries no holdout
    set or it holds no image.

    Raises:
        InvalidHoldoutSet: the holdout set cannot be read or is over its bounds.
    """
    found = read_holdout_set(version_dir)
    if found is None or not found[0].images:
        return None
    holdout, images = found
    files = [image.file for image in holdout.images]
    truth = [holdout.labels[image.true_label] for image in holdout.images]
    accuracies = []
    for version in (candidate, baseline):
        predicted = _predicted_labels(files, images, version, checkpoint)
        accuracies.append(sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth))
    return RolloutVerdict(accuracies[1], accuracies[0], len(truth), max_drop, ON_HOLDOUT_SET)


def _predicted_labels(
    files: list[str], images: list[bytes], version: JudgedVersion, checkpoint: Checkpoint
) -> list[str]:
    """Each image's predicted class name through ``version`` ("" where the decoder refused)."""
    labels = version.labels
    rows, _ = _served_probabilities(files, images, len(labels), version, GOLDEN_LIMITS, checkpoint)
    return [
        "" if not np.isfinite(row).all() else _label(labels, int(np.argmax(row))) for row in rows
    ]


def _label(labels: tuple[str, ...], index: int) -> str:
    return labels[index] if index < len(labels) else str(index)


def _served_probabilities(  # noqa: PLR0913  the set, the version, and where to stop
    files: list[str],
    images: list[bytes],
    classes: int,
    version: JudgedVersion,
    limits: ImageLimits,
    checkpoint: Checkpoint,
) -> tuple[list[np.ndarray], list[str]]:
    """Each image through the server's decode and the graph; refusals as problems (their row
    is NaN)."""
    metadata, sessions = version.metadata, version.sessions
    if metadata is None or metadata.preprocessing is None:
        raise InvalidGoldenSet("the version has a golden set but no preprocessing (model.json)")
    image_input = sessions.inputs[0]
    batched = len(image_input.shape) == 4
    rows: list[np.ndarray] = []
    problems: list[str] = []
    for index, data in enumerate(images):
        checkpoint()
        try:
            pixels = decode_image(
                data, index, metadata.preprocessing, metadata.input_format, limits
            )
        except InvalidInput as error:
            problems.append(f"{files[index]}: refused by the decoder: {error}")
            rows.append(np.full(classes, np.nan))
            continue
        batch = pixels[np.newaxis] if batched else pixels
        outputs = sessions.run({image_input.name: batch.astype(image_input.dtype, copy=False)})
        probabilities = class_probabilities(outputs, sessions.outputs[0].name)
        rows.append(probabilities.reshape(-1))
    return rows, problems
