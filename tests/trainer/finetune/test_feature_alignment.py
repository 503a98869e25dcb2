"""Phase 2's MMD term: it reads the pooled features of the step's labelled batch and of an
unlabelled batch, ramps its weight, trains the features, and leaves BatchNorm's running
statistics to the labelled data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.data.unlabeled import UnlabeledStream
from trainer.finetune.domain_adaptation import dann_ramp
from trainer.finetune.feature_alignment import FeatureAlignment
from trainer.finetune.loop import StepSetup


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _alignment(model: nn.Module, max_weight: float = 2.0) -> FeatureAlignment:
    generator = torch.Generator().manual_seed(0)
    # Brighter than the labelled batches: a shifted target domain.
    images = [
        torch.randint(120, 255, (3, 10, 10), dtype=torch.uint8, generator=generator)
        for _ in range(6)
    ]
    return FeatureAlignment(
        model,
        UnlabeledStream(images, lambda x: x, batch_size=4, seed=0),
        StepSetup(
            device=torch.device("cpu"),
            prepare=lambda x: x.float() / 255,
            mixer=None,
            amp_dtype=None,
            scaler=None,
            loss_fn=nn.CrossEntropyLoss(),
        ),
        max_weight=max_weight,
    )


def test_the_term_aligns_the_step_features_with_the_unlabelled_ones() -> None:
    torch.manual_seed(0)
    model = _Net().train()
    alignment = _alignment(model)
    alignment.begin_epoch(first_step=5, total_steps=10)
    model(torch.rand(4, 3, 10, 10) * 0.4)  # the step's labelled forward
    statistics = model.bn.running_mean.clone(), model.bn.running_var.clone()
    term = alignment(model)
    weight = 2.0 * dann_ramp(0.5)
    assert term.item() > 0
    # The unlabelled batch left the running statistics as the labelled batch made them.
    assert torch.equal(model.bn.running_mean, statistics[0])
    assert torch.equal(model.bn.running_var, statistics[1])
    assert model.bn.momentum == 0.1
    term.backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    record = alignment.end_epoch()["alignment"]
    assert record["method"] == "mmd" and record["steps"] == 1
    assert record["weight"] == pytest.approx(weight)
    assert record["term"] == pytest.approx(term.item(), rel=1e-5)
    assert record["value"] == pytest.approx(term.item() / weight, rel=1e-5)
    assert not model.fc._forward_pre_hooks  # the hook lives only during an epoch


def test_the_weight_ramps_over_the_phase_from_zero() -> None:
    model = _Net().train()
    alignment = _alignment(model, max_weight=1.0)
    alignment.begin_epoch(first_step=0, total_steps=4)
    weights = []
    for _ in range(4):
        model(torch.rand(4, 3, 10, 10))
        alignment(model)
        weights.append(alignment.weight_at(alignment._step - 1))
    alignment.end_epoch()
    assert weights[0] == 0.0 and weights == sorted(weights) and weights[-1] < 1.0


def test_without_the_step_forward_the_term_says_what_is_missing() -> None:
    model = _Net()
    alignment = _alignment(model)
    alignment.begin_epoch(first_step=0, total_steps=1)
    with pytest.raises(RuntimeError, match="the head module did not run"):
        alignment(model)
    alignment.end_epoch()
