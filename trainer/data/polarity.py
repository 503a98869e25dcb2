"""Contrast polarity: inverting labelled images when the unlabelled ones show both polarities.

A digit, a character or a part drawn bright on dark in the lab can be dark on bright where
the model is used (MNIST -> MNIST-M, printed -> photographed). Feature alignment cannot teach
a network that never saw the other polarity to read it; inverting some labelled training
images can. Whether to, and how often, is read from the images themselves:

* An image's **polarity** is whether its centre (the middle half of each side) is brighter
  than its border (the outer eighth): figure on ground for the centred subjects classifiers
  are trained on.
* The labelled images' share of bright centres ``s`` and the unlabelled images' ``t`` are
  measured on seeded samples. Inverting each labelled image with probability ``q`` gives the
  share ``s + q (1 - 2 s)``, so inversion can only move ``s`` toward one half; ``q`` in
  [0, 0.5] is the one that brings it closest to ``t``.
* Inversion is switched on only when it moves the share closer to ``t`` by more than the
  samples' noise (two standard errors of the difference of two shares): images of one
  polarity in both folders, or of mixed polarity in both (natural photographs), leave it off.

Measured on ``benchmarks/domain_shift.py`` (docs/benchmarks.md): lab digits 100% bright
centres, field images 54.5%, inversion at 0.45; field accuracy with ``--unlabeled-data``
0.492 -> 0.675 (three seeds), 0.010 of lab val.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer.data.folders import Sample, decode_all

NOISE_STANDARD_ERRORS = 2.0
MAX_INVERSION = 0.5
# Labelled images measured (a seeded sample of the training split).
SAMPLE_SIZE = 512


@dataclass(frozen=True)
class InversionChoice:
    """The probability of inverting a labelled training image, and the evidence."""

    probability: float
    # "setting" (given, or recorded by the run resumed), "polarity" (measured here) or
    # "no unlabelled images".
    source: str
    labelled_share: float | None = None
    unlabeled_share: float | None = None
    margin: float | None = None
    counts: tuple[int, int] = (0, 0)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"probability": self.probability, "source": self.source}
        if self.source == "polarity":
            document |= {
                "labelled_bright_centre_share": round(float(self.labelled_share or 0.0), 4),
                "unlabeled_bright_centre_share": round(float(self.unlabeled_share or 0.0), 4),
                "margin": round(float(self.margin or 0.0), 4),
                "labelled_images": self.counts[0],
                "unlabeled_images": self.counts[1],
            }
        return document


def bright_centre(image: torch.Tensor) -> bool:
    """Whether the middle half of a uint8 ``[C, H, W]`` image is brighter than its outer eighth."""
    gray = image.float().mean(0)
    height, width = gray.shape
    top, left = height // 4, width // 4
    centre = gray[top : height - top, left : width - left].mean()
    ring_h, ring_w = max(1, height // 8), max(1, width // 8)
    inner = gray[ring_h : height - ring_h, ring_w : width - ring_w]
    border = (gray.sum() - inner.sum()) / max(1, gray.numel() - inner.numel())
    return bool(centre > border)


def bright_centre_share(images: Sequence[torch.Tensor]) -> float:
    """The share of ``images`` whose centre is brighter than their border."""
    return sum(bright_centre(image) for image in images) / len(images) if images else 0.0


def choose_inversion(
    labelled: Sequence[torch.Tensor], unlabeled: Sequence[torch.Tensor]
) -> InversionChoice:
    """The inversion probability that matches the labelled images' polarity to the unlabelled
    images' (see the module docstring); 0 when that is within the samples' noise."""
    s, t = bright_centre_share(labelled), bright_centre_share(unlabeled)
    n, m = len(labelled), len(unlabeled)
    margin = NOISE_STANDARD_ERRORS * math.sqrt(s * (1 - s) / max(1, n) + t * (1 - t) / max(1, m))
    margin = max(margin, 1.0 / max(1, min(n, m)))
    slope = 1.0 - 2.0 * s  # d(share)/dq
    best = 0.0 if slope == 0 else min(max((t - s) / slope, 0.0), MAX_INVERSION)
    gain = abs(s - t) - abs(s + best * slope - t)
    probability = round(best, 2) if gain > margin else 0.0
    return InversionChoice(probability, "polarity", s, t, margin, (n, m))


def labelled_sample(
    train: Sequence[Sample], *, shorter_side: int, seed: int, threads: int
) -> list[torch.Tensor]:
    """A seeded sample of up to ``SAMPLE_SIZE`` training images, decoded (unreadable ones
    left out: the training data's own checks report them)."""
    chosen = list(train)
    random.Random(seed).shuffle(chosen)
    decoded, _ = decode_all(
        chosen[:SAMPLE_SIZE], shorter_side=shorter_side, strict=False, threads=threads
    )
    return decoded
