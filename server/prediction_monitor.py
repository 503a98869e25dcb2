"""What production sees, per model version: predictions by class, confidence, abstentions, drift.

Serving peers report latencies; a team that owns a classifier also needs to know what it
predicts. Per version this keeps a counter of predictions by class, a histogram of the top
probability, an abstention counter, and a drift gauge: the population stability index (PSI)
between the class distribution of the last ``window`` predictions and the val split's
distribution recorded at export,

    PSI = sum over classes of (live - reference) * ln(live / reference)

with both distributions smoothed by ``EPSILON`` so an unseen class stays finite. Rules of
thumb: below 0.1 stable, 0.1-0.25 moderate shift, above 0.25 a shift worth a look. The gauge
is NaN until the window is full or when the export recorded no distribution. Label values
are the model's class names, at most ``MAX_LABELS`` per version (the rest count as "other"),
so a 10,000-class model cannot blow up the metrics' cardinality.

Answers to a load test (``contracts.load_test``) describe the load generator's image, not
production: they are counted apart and touch none of the above.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

EPSILON = 1e-4
DEFAULT_WINDOW = 1000
MAX_LABELS = 100
OTHER = "other"


def population_stability_index(live: Sequence[float], reference: Sequence[float]) -> float:
    """PSI between two distributions over the same classes (each renormalised after smoothing)."""
    live_total = sum(live) + EPSILON * len(live)
    reference_total = sum(reference) + EPSILON * len(reference)
    index = 0.0
    for observed, expected in zip(live, reference, strict=True):
        p = (observed + EPSILON) / live_total
        q = (expected + EPSILON) / reference_total
        index += (p - q) * math.log(p / q)
    return index


def prediction_label_values(labels: Sequence[str]) -> tuple[str, ...]:
    """The ``label`` value each class is counted under: its name, ``other`` past the cap."""
    return tuple(label if i < MAX_LABELS else OTHER for i, label in enumerate(labels))


@dataclass(frozen=True)
class VersionMetrics:
    """The metric callbacks of one model version (bound to its label values)."""

    count_prediction: Callable[[str], None]
    observe_top_probability: Callable[[float], None]
    count_abstention: Callable[[], None]
    set_drift: Callable[[float], None]
    count_load_test: Callable[[], None] = lambda: None


class PredictionMonitor:
    """Feeds one version's metrics from its served predictions; thread-safe."""

    def __init__(
        self,
        labels: Sequence[str],
        reference: Sequence[float] | None,
        metrics: VersionMetrics,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        """
        Args:
            labels: class names in output order.
            reference: the val split's class counts or shares at export, or None.
            window: how many recent predictions the live distribution covers.
        """
        self.labels = tuple(labels)
        self.metric_labels = prediction_label_values(self.labels)
        has_reference = reference is not None and len(reference) == len(self.labels)
        self.reference = tuple(reference) if has_reference and reference is not None else None
        self.metrics = metrics
        self._recent: deque[int] = deque(maxlen=window)
        self._counts: Counter[int] = Counter()
        self._lock = threading.Lock()
        metrics.set_drift(math.nan)

    def skip_load_test(self) -> None:
        """Count one answer to a load test, leaving the production metrics and drift alone."""
        self.metrics.count_load_test()

    def observe(self, predicted: int, top_probability: float, abstained: bool) -> None:
        """Record one served prediction (its class index and top probability)."""
        self.metrics.count_prediction(self.metric_labels[predicted])
        self.metrics.observe_top_probability(top_probability)
        if abstained:
            self.metrics.count_abstention()
        with self._lock:
            if len(self._recent) == self._recent.maxlen:
                self._counts[self._recent[0]] -= 1
            self._recent.append(predicted)
            self._counts[predicted] += 1
            full = len(self._recent) == self._recent.maxlen
            live = [self._counts[i] for i in range(len(self.labels))]
        if full and self.reference is not None:
            self.metrics.set_drift(population_stability_index(live, self.reference))


class PredictionMonitors:
    """One ``PredictionMonitor`` per served model version, made on its first answer."""

    def __init__(
        self, metrics_for: Callable[[str, str], VersionMetrics], window: int = DEFAULT_WINDOW
    ) -> None:
        self._metrics_for = metrics_for
        self._window = window
        self._monitors: dict[tuple[str, str, tuple[str, ...]], PredictionMonitor] = {}
        self._lock = threading.Lock()

    def for_version(
        self,
        name: str,
        version: str,
        labels: Sequence[str],
        reference: Sequence[float] | None,
    ) -> PredictionMonitor:
        """The monitor of ``name``/``version`` (a reload with other labels gets a new one)."""
        key = (name, version, tuple(labels))
        with self._lock:
            monitor = self._monitors.get(key)
            if monitor is None:
                metrics = self._metrics_for(name, version)
                monitor = PredictionMonitor(labels, reference, metrics, self._window)
                self._monitors[key] = monitor
            return monitor

    def forget(self, name: str, version: str) -> None:
        """Drop the monitors of a retired version (its metric series are dropped with it)."""
        with self._lock:
            for key in [k for k in self._monitors if k[:2] == (name, version)]:
                del self._monitors[key]
