"""Extra terms of phase 2's training loss, beside the classification loss.

A ``StepPenalty`` adds one scalar to each training step's loss and keeps its own record of
what it added; ``loop.train_one_epoch`` calls it, the phase runner brackets each epoch with
``begin_epoch`` and the records land in ``metrics.jsonl``. The two of this trainer are the
feature alignment toward unlabelled target images (``trainer.finetune.feature_alignment``) and the
forgetting guard toward the source weights (``trainer.finetune.forgetting``); ``CombinedPenalty``
runs several.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn


class StepPenalty(Protocol):
    """One extra loss term of a training step."""

    def begin_epoch(self, first_step: int, total_steps: int) -> None:
        """An epoch starts at step ``first_step`` (0-based) of the phase's ``total_steps``."""

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The weighted term to add to this step's loss; ``model`` is what the step ran."""

    def end_epoch(self) -> dict[str, Any]:
        """What the term was over the epoch's steps (for the epoch's metrics record)."""


class CombinedPenalty:
    """The sum of several penalties; their records side by side."""

    def __init__(self, parts: Sequence[StepPenalty]) -> None:
        self.parts = list(parts)

    def begin_epoch(self, first_step: int, total_steps: int) -> None:
        for part in self.parts:
            part.begin_epoch(first_step, total_steps)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        terms = [part(model) for part in self.parts]
        return torch.stack(terms).sum()

    def end_epoch(self) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for part in self.parts:
            record |= part.end_epoch()
        return record


def combine(parts: Sequence[StepPenalty]) -> StepPenalty | None:
    """None for no penalty, the penalty itself for one, else their ``CombinedPenalty``."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return CombinedPenalty(parts)


class TermRecord:
    """Running sums of one term over an epoch, kept on the device: reading them back is a
    host-device sync, done once at the epoch's end instead of every step."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.term: torch.Tensor | None = None
        self.steps = 0
        self.weight = 0.0

    def reset(self) -> None:
        self.value = self.term = None
        self.steps = 0
        self.weight = 0.0

    def add(self, value: torch.Tensor, weight: float) -> None:
        value = value.detach().float()
        self.value = value if self.value is None else self.value + value
        self.term = value * weight if self.term is None else self.term + value * weight
        self.steps += 1
        self.weight = weight

    def summary(self) -> dict[str, Any]:
        """Mean raw value, mean weighted term, the last weight, the steps; then reset."""
        steps = max(1, self.steps)
        summary = {
            "value": float(self.value) / steps if self.value is not None else None,
            "term": float(self.term) / steps if self.term is not None else None,
            "weight": self.weight,
            "steps": self.steps,
        }
        self.reset()
        return summary
