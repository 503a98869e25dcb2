"""Latency statistics and the load-test report: percentiles, throughput, errors by status."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks.

    Matches ``numpy.percentile(..., method="linear")``; NaN for an empty sequence so a report of
    a run with no successful request says so instead of inventing a zero.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    fraction = position - lower
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * fraction


@dataclasses.dataclass(frozen=True)
class LatencySummary:
    """Latency distribution of successful requests, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def from_seconds(cls, latencies_s: Sequence[float]) -> LatencySummary:
        values = sorted(v * 1000.0 for v in latencies_s)
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            count=len(values),
            mean_ms=sum(values) / len(values),
            p50_ms=percentile(values, 50),
            p90_ms=percentile(values, 90),
            p99_ms=percentile(values, 99),
            max_ms=values[-1],
        )


@dataclasses.dataclass(frozen=True)
class BenchReport:
    """What one load test measured.

    Attributes:
        target: the server that was loaded.
        mode: ``concurrency`` (closed loop) or ``rate`` (open loop, latency counted from the
            scheduled send time so a slow server cannot hide its queueing).
        concurrency: closed-loop workers, or the cap on requests in flight in rate mode.
        rate: requests per second asked for in rate mode, else ``None``.
        batch: images (tensor rows) per request.
        duration_s: length of the measurement window, after warm-up.
        requests_ok: successful requests completed inside the window.
        errors: failed requests inside the window, by gRPC status code name.
        latency: distribution over the successful requests.
        stopped: why the load ended early (the server went away), else ``None``; the window
            then ends there.
    """

    target: str
    mode: str
    concurrency: int
    rate: float | None
    batch: int
    duration_s: float
    requests_ok: int
    errors: Mapping[str, int]
    latency: LatencySummary
    stopped: str | None = None

    @property
    def requests_per_s(self) -> float:
        return self.requests_ok / self.duration_s if self.duration_s > 0 else math.nan

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.batch

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["errors"] = dict(self.errors)
        data["requests_per_s"] = self.requests_per_s
        data["images_per_s"] = self.images_per_s
        data["error_count"] = self.error_count
        return _nan_to_none(data)

    def format_text(self) -> str:
        lat = self.latency
        load = (
            f"concurrency {self.concurrency}"
            if self.mode == "concurrency"
            else f"rate {self.rate:g}/s (at most {self.concurrency} in flight)"
        )
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"
        stopped = [f"stopped     early: {self.stopped}"] if self.stopped else []
        return "\n".join(
            [
                f"target      {self.target}",
                f"load        {load}, batch {self.batch}, {self.duration_s:.1f} s measured",
                f"requests    {self.requests_ok} ok, {self.error_count} failed",
                f"throughput  {self.requests_per_s:.1f} req/s, {self.images_per_s:.1f} images/s",
                f"latency ms  p50 {lat.p50_ms:.2f}  p90 {lat.p90_ms:.2f}  "
                f"p99 {lat.p99_ms:.2f}  max {lat.max_ms:.2f}  mean {lat.mean_ms:.2f}",
                f"errors      {errors}",
                *stopped,
            ]
        )


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN; ``None`` keeps the output parseable by strict readers."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return value
