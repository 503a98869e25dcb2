"""The abstention threshold each exported version carries.

The server answers ``abstained: true`` when an image's top probability is below the version's
threshold. The threshold is chosen on the val split's (calibrated) probabilities for a target
precision of the answered predictions: the lowest threshold whose answered predictions are
right at least ``target_precision`` of the time, which answers as many images as that target
allows. What share of val images it answers (the coverage) is recorded with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from contracts.model_metadata import Abstention

DEFAULT_TARGET_PRECISION = 0.95


@dataclass(frozen=True)
class AbstentionPolicy:
    """Answer when the top probability is at least ``threshold``; abstain below it."""

    threshold: float
    target_precision: float
    precision: float
    coverage: float
    count: int

    def record(self) -> Abstention:
        """The ``abstention`` entry of ``model.json`` (rounded to 6 digits)."""
        return Abstention(
            threshold=round(self.threshold, 6),
            target_precision=self.target_precision,
            precision=round(self.precision, 6),
            coverage=round(self.coverage, 6),
            count=self.count,
        )

    def to_dict(self) -> dict[str, Any]:
        """The record's keys, for logs and reports."""
        return self.record().to_dict()


def choose_threshold(
    probabilities: np.ndarray, labels: np.ndarray, target_precision: float
) -> AbstentionPolicy:
    """The threshold with the widest coverage whose answered precision meets the target.

    Only boundaries between distinct confidences are candidates, so every image at the
    threshold's confidence is on the same side of it. When no threshold meets the target the
    version abstains on everything (threshold above every val confidence, coverage 0).
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    precision = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    # Index k answers the k+1 most confident images; it is a candidate only where the next
    # image is less confident (or there is none).
    boundary = np.append(confidence[1:] < confidence[:-1], True)
    meets = np.flatnonzero(boundary & (precision >= target_precision))
    count = len(labels)
    if count == 0 or len(meets) == 0:
        above_all = float(np.nextafter(confidence[0], np.inf)) if count else 1.0
        return AbstentionPolicy(above_all, target_precision, 1.0, 0.0, count)
    k = int(meets[-1])
    threshold = 0.0 if k == count - 1 else float(confidence[k])
    return AbstentionPolicy(
        threshold, target_precision, float(precision[k]), (k + 1) / count, count
    )
