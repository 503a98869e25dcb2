"""Extra loss terms: several add up, each keeps its own record, read back once an epoch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from trainer.finetune.step_penalty import CombinedPenalty, TermRecord, combine


class _Constant:
    def __init__(self, name: str, value: float, weight: float) -> None:
        self.name, self.value, self.weight = name, value, weight
        self.record = TermRecord()
        self.started: tuple[int, int] | None = None

    def begin_epoch(self, first_step: int, total_steps: int) -> None:
        self.started = (first_step, total_steps)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        value = torch.tensor(self.value)
        self.record.add(value, self.weight)
        return value * self.weight

    def end_epoch(self) -> dict[str, Any]:
        return {self.name: self.record.summary()}


def test_combined_terms_add_up_and_keep_their_records() -> None:
    a, b = _Constant("a", 2.0, 0.5), _Constant("b", 3.0, 2.0)
    combined = combine([a, b])
    assert isinstance(combined, CombinedPenalty)
    combined.begin_epoch(4, 10)
    assert a.started == b.started == (4, 10)
    assert combined(nn.Identity()).item() == pytest.approx(2.0 * 0.5 + 3.0 * 2.0)
    combined(nn.Identity())
    record = combined.end_epoch()
    assert record["a"] == {"value": 2.0, "term": 1.0, "weight": 0.5, "steps": 2}
    assert record["b"] == {"value": 3.0, "term": 6.0, "weight": 2.0, "steps": 2}
    # The record starts again each epoch.
    assert combined.end_epoch()["a"] == {"value": None, "term": None, "weight": 0.0, "steps": 0}


def test_combine_of_none_or_one() -> None:
    only = _Constant("a", 1.0, 1.0)
    assert combine([]) is None
    assert combine([only]) is only
