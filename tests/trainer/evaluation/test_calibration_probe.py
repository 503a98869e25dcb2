"""Temperature scaling and the linear probe, on synthetic features with a known answer."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from trainer.evaluation.calibration import expected_calibration_error, fit_temperature
from trainer.head.linear_probe import LabelledFeatures, fit_linear_probe


def _centres(classes: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed)) * 3


def _blobs(centres: torch.Tensor, n: int, spread: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(centres)
    features = centres[labels] + spread * torch.randn(n, centres.shape[1], generator=generator)
    # Features of a frozen backbone after ReLU and pooling: non-negative and offset.
    return features.relu() + 5.0, labels


def test_overconfident_logits_get_a_temperature_above_one_and_lower_nll() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=generator)
    clean = torch.nn.functional.one_hot(labels, 4).float() * 2.0
    logits = (clean + 1.5 * torch.randn(600, 4, generator=generator)) * 6.0  # overconfident
    result = fit_temperature(logits, labels)
    assert result.temperature > 2.0
    assert result.nll_after < result.nll_before
    assert result.ece_after < result.ece_before
    assert (logits / result.temperature).argmax(1).equal(logits.argmax(1))


def test_underconfident_logits_get_a_temperature_below_one() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (600,), generator=generator)
    logits = torch.nn.functional.one_hot(labels, 3).float() * 0.3  # right but timid
    logits += 0.05 * torch.randn(600, 3, generator=generator)
    result = fit_temperature(logits, labels)
    assert result.temperature < 0.5
    assert result.nll_after < result.nll_before


def test_ece_of_a_perfectly_calibrated_and_a_wrong_model() -> None:
    labels = torch.tensor([0, 1, 0, 1])
    certain_right = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(certain_right, labels) == pytest.approx(0.0)
    assert expected_calibration_error(certain_right.flip(1), labels) == pytest.approx(1.0)


def test_probe_matches_scikit_learn_logistic_regression() -> None:
    centres = _centres(5, 32, seed=2)
    x, y = _blobs(centres, 400, spread=4.0, seed=2)
    vx, vy = _blobs(centres, 200, spread=4.0, seed=3)
    result = fit_linear_probe(LabelledFeatures(x, y), LabelledFeatures(vx, vy), num_classes=5)
    reference = LogisticRegression(max_iter=5000).fit(x.numpy(), y.numpy())
    reference_accuracy = reference.score(vx.numpy(), vy.numpy())
    assert result.val_accuracy >= 0.95 * reference_accuracy
    assert result.val_accuracy > 0.5  # well above chance (0.2)
    assert len(result.trials) >= 3
    head = nn.Linear(32, 5)
    result.load_into(head)
    with torch.no_grad():
        accuracy = float((head(vx).argmax(1) == vy).float().mean())
    assert accuracy == pytest.approx(result.val_accuracy, abs=1e-6)


def test_probe_class_weights_lift_the_rare_class() -> None:
    x, y = _blobs(_centres(2, 8, seed=4), 600, spread=6.0, seed=4)
    keep = (y == 0) | (torch.arange(600) % 10 == 1)  # class 1 is a tenth as common
    x, y = x[keep], y[keep]
    counts = torch.bincount(y, minlength=2).double()
    both = LabelledFeatures(x, y)
    plain = fit_linear_probe(both, both, 2, l2_grid=(1e-3,))
    balanced = fit_linear_probe(both, both, 2, l2_grid=(1e-3,), class_weights=counts.sum() / counts)

    def recall_of_rare(result) -> float:
        predicted = (x @ result.weight.T + result.bias).argmax(1)
        return float((predicted[y == 1] == 1).float().mean())

    assert recall_of_rare(balanced) >= recall_of_rare(plain)
