"""Per-version cumulative statistics in the shape of Triton's ``ModelStatistics``.

Counted the way Triton counts them, because its tools compare the numbers:
- ``success``/``fail``: requests, with their durations from arrival to answer.
- ``queue``, ``compute_input``, ``compute_infer``, ``compute_output``: one count per
  *successful request*, so the four counts always equal ``success.count`` (perf_analyzer aborts
  with "Server side statistics compute counts must be the same" otherwise). A request computed
  in a batch is charged the batch's phase durations, as Triton does.
- ``inference_count``: rows inferred (a request of batch n counts n); ``execution_count``:
  model executions (batches).

Only ``ModelVersion`` writes these, on the event loop, so no lock is needed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from server.batching import BatchObserver, BatchResult


@dataclass
class DurationStat:
    """A count and the sum of its durations, in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStatistics:
    """Cumulative statistics of one model version."""

    success: DurationStat = field(default_factory=DurationStat)
    fail: DurationStat = field(default_factory=DurationStat)
    queue: DurationStat = field(default_factory=DurationStat)
    compute_input: DurationStat = field(default_factory=DurationStat)
    compute_infer: DurationStat = field(default_factory=DurationStat)
    compute_output: DurationStat = field(default_factory=DurationStat)
    inference_count: int = 0
    execution_count: int = 0
    # Milliseconds since the epoch of the last answered request (0: none yet).
    last_inference_ms: int = 0

    def record_success(self, request_s: float, rows: int, result: BatchResult) -> None:
        """One answered request of ``rows`` rows and the phases of the batch that computed it."""
        self.success.add(request_s)
        self.queue.add(result.queue_s)
        self.compute_input.add(result.input_s)
        self.compute_infer.add(result.infer_s)
        self.compute_output.add(result.output_s)
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, request_s: float) -> None:
        """One request that reached this version and failed."""
        self.fail.add(request_s)

    def snapshot(self) -> ModelStatistics:
        """A copy that later requests do not change."""
        return copy.deepcopy(self)

    def record_execution(self) -> None:
        """One model execution (a batch, successful or not)."""
        self.execution_count += 1


@dataclass(frozen=True)
class VersionStatistics:
    """A snapshot for the ModelStatistics RPC."""

    name: str
    version: str
    stats: ModelStatistics


class CountingObserver(BatchObserver):
    """Counts executions for the statistics and forwards every batch event to ``inner``."""

    def __init__(self, inner: BatchObserver, stats: ModelStatistics) -> None:
        self._inner = inner
        self._stats = stats

    def queue_depth(self, depth: int) -> None:
        self._inner.queue_depth(depth)

    def batch_done(self, batch_size: int, request_count: int, compute_s: float) -> None:
        self._stats.record_execution()
        self._inner.batch_done(batch_size, request_count, compute_s)

    def expired(self) -> None:
        self._inner.expired()
