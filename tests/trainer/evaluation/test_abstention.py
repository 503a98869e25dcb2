"""The abstention threshold meets its precision target on data it was not chosen on."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.evaluation.abstention import choose_threshold


def _calibrated(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose top value is the chance of being right (calibrated by design)."""
    rng = np.random.default_rng(seed)
    top = rng.uniform(1.0 / classes, 1.0, n)
    predicted = rng.integers(0, classes, n)
    right = rng.uniform(size=n) < top
    labels = np.where(right, predicted, (predicted + rng.integers(1, classes, n)) % classes)
    probabilities = np.tile(((1 - top) / (classes - 1))[:, None], (1, classes))
    probabilities[np.arange(n), predicted] = top
    return probabilities, labels


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_threshold_meets_its_target_on_held_out_data(target: float) -> None:
    val_probs, val_labels = _calibrated(4000, 5, seed=0)
    policy = choose_threshold(val_probs, val_labels, target)
    assert policy.precision >= target
    assert 0 < policy.coverage < 1
    held_probs, held_labels = _calibrated(20000, 5, seed=1)
    answered = held_probs.max(axis=1) >= policy.threshold
    precision = (held_probs.argmax(axis=1) == held_labels)[answered].mean()
    assert precision >= target - 0.02
    assert answered.mean() == pytest.approx(policy.coverage, abs=0.03)


def test_a_model_that_is_always_right_never_abstains() -> None:
    probabilities = np.array([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    policy = choose_threshold(probabilities, np.array([0, 1, 0]), 0.99)
    assert (policy.threshold, policy.coverage) == (0.0, 1.0)


def test_no_threshold_meets_the_target_means_abstain_on_everything() -> None:
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2]])
    policy = choose_threshold(probabilities, np.array([1, 1]), 0.5)
    assert policy.coverage == 0.0
    assert policy.threshold > 0.9


def test_ties_stay_on_one_side() -> None:
    probabilities = np.array([[0.9, 0.1], [0.7, 0.3], [0.7, 0.3], [0.6, 0.4]])
    policy = choose_threshold(probabilities, np.array([0, 0, 1, 0]), 0.99)
    assert policy.threshold == pytest.approx(0.9)
    assert policy.coverage == 0.25


def test_target_out_of_range() -> None:
    with pytest.raises(ValueError, match="target precision"):
        choose_threshold(np.ones((1, 2)) / 2, np.array([0]), 1.5)
