"""``--class-balance auto``: weight the loss by inverse class frequency on imbalanced data.

When the largest class has at least ``IMBALANCE_RATIO`` times the training images of the
smallest, each class's loss (and the linear probe's) is weighted by ``N / (C * n_c)``, so every
class contributes as much as under a balanced split. Loss weights, not a balanced sampler: the
sampler stays the resumable per-epoch permutation, and no image is dropped or repeated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer.progress import log_event

log = logging.getLogger(__name__)

IMBALANCE_RATIO = 3.0


@dataclass(frozen=True)
class ClassBalance:
    """The per-class training counts, the ratio of the largest to the smallest, the weights."""

    counts: tuple[int, ...]
    ratio: float
    weights: tuple[float, ...] | None

    @property
    def tensor(self) -> torch.Tensor | None:
        return None if self.weights is None else torch.tensor(self.weights, dtype=torch.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": list(self.counts),
            "ratio": round(self.ratio, 3),
            "weighted": self.weights is not None,
            "weights": None if self.weights is None else [round(w, 4) for w in self.weights],
        }


def class_balance(labels: Sequence[int], num_classes: int, mode: str) -> ClassBalance:
    """The balance of ``labels`` and, under ``auto`` when imbalanced, the loss weights."""
    counts = [0] * num_classes
    for label in labels:
        counts[label] += 1
    smallest = max(1, min(counts))
    ratio = max(counts) / smallest
    weights = None
    if mode == "auto" and ratio >= IMBALANCE_RATIO:
        total = sum(counts)
        weights = tuple(total / (num_classes * max(1, c)) for c in counts)
    balance = ClassBalance(tuple(counts), ratio, weights)
    log_event(log, "class_balance", mode=mode, **balance.to_dict())
    return balance
