"""An asyncio load generator: closed loop at fixed concurrency, or open loop at a fixed rate.

It knows nothing about what a request is: it awaits a zero-argument coroutine factory and
classifies failures by gRPC status code. Only requests that *complete* inside the measurement
window (after warm-up) count, so warm-up and the drain at the end do not bias throughput.

A server that goes away mid-run makes every call fail at once with UNAVAILABLE, thousands a
second: a run of ``unavailable_burst`` UNAVAILABLE failures with no other answer between them
ends the load early, and the report says why instead of counting the spin. Only an answer to a
request sent after the run began breaks it: a late reply to a request sent before the server
went away says nothing about the server now.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable

import grpc

from client.stats import BenchReport, LatencySummary

Call = Callable[[], Awaitable[object]]

# UNAVAILABLE failures in a row, with no answer between them, that end a run: at least every
# request in flight (they all fail together when the server goes), and never a handful.
MIN_UNAVAILABLE_BURST = 20


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """Shape of a load test.

    Attributes:
        concurrency: closed-loop workers; in rate mode, the cap on requests in flight.
        rate: requests per second for an open-loop test; ``None`` for closed loop.
        duration_s: measurement window.
        warmup_s: load applied before the window opens, not counted.
        batch: images per request, used only to report images per second.
    """

    concurrency: int = 1
    rate: float | None = None
    duration_s: float = 10.0
    warmup_s: float = 1.0
    batch: int = 1

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if self.duration_s <= 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s must not be negative, got {self.warmup_s}")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")


def status_name(exc: BaseException) -> str:
    """The gRPC status code name of a failed call; other exceptions are named by type."""
    code = getattr(exc, "code", None)
    if callable(code):
        value = code()
        if isinstance(value, grpc.StatusCode):
            return value.name
    return type(exc).__name__


def _details(exc: BaseException) -> str:
    """The first line of a failure's message (a gRPC error's details), at most 200 characters."""
    details = getattr(exc, "details", None)
    lines = str(details() if callable(details) else exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


class _Recorder:
    def __init__(self, window_start: float, window_end: float, unavailable_burst: int) -> None:
        self.window_start = window_start
        self.window_end = window_end
        self.unavailable_burst = unavailable_burst
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self._unavailable_in_a_row = 0
        # When the first request of the current run of UNAVAILABLE failures was sent.
        self._burst_sent_at = float("inf")
        # Why the run ended early, and when (None: it ran its course).
        self.stopped: str | None = None
        self.stopped_at: float | None = None

    @property
    def is_running(self) -> bool:
        return self.stopped is None and time.perf_counter() < self.window_end

    async def measure(self, call: Call, scheduled: float) -> None:
        sent = time.perf_counter()
        try:
            await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            now = time.perf_counter()
            code = status_name(exc)
            if self.window_start <= now <= self.window_end and self.stopped is None:
                self.errors[code] += 1
            if code == "UNAVAILABLE":
                self._count_unavailable(sent, now, exc)
            else:
                self._answered(sent)
            return
        done = time.perf_counter()
        self._answered(sent)
        if self.window_start <= done <= self.window_end:
            self.latencies.append(done - scheduled)

    def _answered(self, sent: float) -> None:
        if sent > self._burst_sent_at:
            self._unavailable_in_a_row = 0
            self._burst_sent_at = float("inf")

    def _count_unavailable(self, sent: float, now: float, exc: Exception) -> None:
        self._burst_sent_at = min(self._burst_sent_at, sent)
        self._unavailable_in_a_row += 1
        if self._unavailable_in_a_row >= self.unavailable_burst and self.stopped is None:
            self.stopped = (
                f"{self._unavailable_in_a_row} requests in a row failed UNAVAILABLE (the server "
                f"is gone or not serving): {_details(exc)}"
            )
            self.stopped_at = now


@dataclasses.dataclass(frozen=True)
class LoadSamples:
    """Raw measurements of one window, for callers that merge several windows."""

    latencies_s: list[float]
    errors: dict[str, int]
    window_s: float
    # Why the load ended before the window did (None: it did not).
    stopped: str | None = None


async def collect_load(call: Call, spec: LoadSpec) -> LoadSamples:
    """Applies the load described by ``spec``; returns what completed inside the window."""
    start = time.perf_counter()
    recorder = _Recorder(
        start + spec.warmup_s,
        start + spec.warmup_s + spec.duration_s,
        max(MIN_UNAVAILABLE_BURST, 2 * spec.concurrency),
    )
    if spec.rate is None:
        await _closed_loop(call, spec, recorder)
    else:
        await _open_loop(call, spec, recorder, spec.rate)
    window_s = spec.duration_s
    if recorder.stopped_at is not None:
        window_s = min(window_s, max(0.0, recorder.stopped_at - recorder.window_start))
    return LoadSamples(recorder.latencies, dict(recorder.errors), window_s, recorder.stopped)


def build_report(samples: LoadSamples, spec: LoadSpec, *, target: str) -> BenchReport:
    return BenchReport(
        target=target,
        mode="concurrency" if spec.rate is None else "rate",
        concurrency=spec.concurrency,
        rate=spec.rate,
        batch=spec.batch,
        duration_s=samples.window_s,
        requests_ok=len(samples.latencies_s),
        errors=dict(samples.errors),
        latency=LatencySummary.from_seconds(samples.latencies_s),
        stopped=samples.stopped,
    )


async def run_load(call: Call, spec: LoadSpec, *, target: str) -> BenchReport:
    """Applies the load described by ``spec`` and reports what was measured."""
    return build_report(await collect_load(call, spec), spec, target=target)


async def _closed_loop(call: Call, spec: LoadSpec, recorder: _Recorder) -> None:
    async def worker() -> None:
        while recorder.is_running:
            await recorder.measure(call, time.perf_counter())

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))


async def _open_loop(call: Call, spec: LoadSpec, recorder: _Recorder, rate: float) -> None:
    # Latency runs from the scheduled send time: when the server falls behind, the wait for a
    # free slot is part of what a user would see (no coordinated omission).
    slots = asyncio.Semaphore(spec.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    interval = 1.0 / rate
    begin = time.perf_counter()

    async def one(scheduled: float) -> None:
        async with slots:
            # Sends still waiting for a slot when the window closes would only prolong the drain.
            if recorder.is_running:
                await recorder.measure(call, scheduled)

    n = 0
    while True:
        scheduled = begin + n * interval
        if scheduled >= recorder.window_end or recorder.stopped is not None:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.gather(*tasks)
