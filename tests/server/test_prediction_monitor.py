"""Production metrics: counts by class, confidence, abstentions and drift against val."""

from __future__ import annotations

import math

import pytest

from server.prediction_monitor import (
    MAX_LABELS,
    OTHER,
    PredictionMonitor,
    VersionMetrics,
    population_stability_index,
)


class Recorded:
    def __init__(self) -> None:
        self.predictions: dict[str, int] = {}
        self.top: list[float] = []
        self.abstentions = 0
        self.drift = -1.0

    def metrics(self) -> VersionMetrics:
        def count(label: str) -> None:
            self.predictions[label] = self.predictions.get(label, 0) + 1

        def abstain() -> None:
            self.abstentions += 1

        def drift(value: float) -> None:
            self.drift = value

        return VersionMetrics(count, self.top.append, abstain, drift)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_shift() -> None:
    assert population_stability_index([10, 10, 10], [5, 5, 5]) == pytest.approx(0.0, abs=1e-9)
    mild = population_stability_index([12, 10, 8], [10, 10, 10])
    strong = population_stability_index([28, 1, 1], [10, 10, 10])
    assert 0 < mild < 0.1
    assert strong > 0.25
    assert math.isfinite(population_stability_index([30, 0, 0], [10, 10, 10]))


def test_metrics_follow_the_predictions() -> None:
    recorded = Recorded()
    monitor = PredictionMonitor(("a", "b"), (50, 50), recorded.metrics(), window=4)
    assert math.isnan(recorded.drift)  # no full window yet
    for predicted, top, abstained in ((0, 0.9, False), (0, 0.4, True), (1, 0.8, False)):
        monitor.observe(predicted, top, abstained)
    assert recorded.predictions == {"a": 2, "b": 1}
    assert recorded.top == [0.9, 0.4, 0.8]
    assert recorded.abstentions == 1
    assert math.isnan(recorded.drift)
    monitor.observe(1, 0.7, False)  # window full: 2 a, 2 b against 50/50
    assert recorded.drift == pytest.approx(0.0, abs=1e-6)
    for _ in range(4):
        monitor.observe(0, 0.9, False)  # the window slides to 4 a, 0 b
    assert recorded.drift > 0.25


def test_without_a_reference_drift_stays_nan() -> None:
    recorded = Recorded()
    monitor = PredictionMonitor(("a", "b"), None, recorded.metrics(), window=2)
    monitor.observe(0, 0.9, False)
    monitor.observe(0, 0.9, False)
    assert math.isnan(recorded.drift)


def test_label_cardinality_is_capped() -> None:
    recorded = Recorded()
    labels = [f"class{i}" for i in range(MAX_LABELS + 50)]
    monitor = PredictionMonitor(labels, None, recorded.metrics())
    for index in range(len(labels)):
        monitor.observe(index, 0.5, False)
    assert len(recorded.predictions) == MAX_LABELS + 1
    assert recorded.predictions[OTHER] == 50
