"""The dynamic batcher through its public submit(), with a fake compute function."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from server.batching import BatchingSettings, BatchObserver, DynamicBatcher
from server.errors import DeadlineExceeded, Overloaded


class Recorder(BatchObserver):
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.expired_count = 0

    def batch_done(self, batch_size: int, request_count: int, compute_s: float) -> None:
        self.batch_sizes.append(batch_size)

    def expired(self) -> None:
        self.expired_count += 1


class GatedCompute:
    """Doubles its input; the first call waits until ``release`` is set."""

    def __init__(self, gate_first: bool = False) -> None:
        self.calls: list[np.ndarray] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not gate_first:
            self.release.set()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(inputs["x"].copy())
        self.started.set()
        self.release.wait(10)
        return {"y": inputs["x"] * 2}


def make_batcher(
    compute: GatedCompute,
    recorder: Recorder,
    *,
    max_batch: int = 8,
    delay_s: float = 0.01,
    queue: int = 64,
) -> DynamicBatcher:
    settings = BatchingSettings(max_batch, delay_s, queue, workers=1)
    return DynamicBatcher(compute, settings, ThreadPoolExecutor(1), recorder)


async def _wait_started(compute: GatedCompute) -> None:
    while not compute.started.is_set():
        await asyncio.sleep(0.001)


def test_concurrent_requests_each_get_their_own_rows() -> None:
    compute, recorder = GatedCompute(), Recorder()

    async def scenario() -> None:
        batcher = make_batcher(compute, recorder, max_batch=8, delay_s=0.02)
        await batcher.start()
        sizes = [1 + (i % 3) for i in range(40)]
        requests = [np.full((n, 2), i, dtype=np.int64) for i, n in enumerate(sizes)]
        results = await asyncio.gather(*(batcher.submit({"x": r}) for r in requests))
        for request, result in zip(requests, results, strict=True):
            np.testing.assert_array_equal(result.outputs["y"], request * 2)
        await batcher.stop()

    asyncio.run(scenario())
    assert max(recorder.batch_sizes) > 1
    assert max(recorder.batch_sizes) <= 8
    assert sum(recorder.batch_sizes) == sum(1 + (i % 3) for i in range(40))


def test_failed_batch_fails_every_request_with_the_cause() -> None:
    def explode(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("device lost")

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(
            explode, BatchingSettings(8, 0.02, 64), ThreadPoolExecutor(1), Recorder()
        )
        await batcher.start()
        results: list[object] = list(
            await asyncio.gather(
                *(batcher.submit({"x": np.zeros((1, 2))}) for _ in range(5)),
                return_exceptions=True,
            )
        )
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "device lost" in str(r) for r in results)


def test_expired_deadline_is_dropped_before_compute() -> None:
    compute, recorder = GatedCompute(gate_first=True), Recorder()

    async def scenario() -> None:
        batcher = make_batcher(compute, recorder, max_batch=1, delay_s=0)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 2))}))
        await _wait_started(compute)
        deadline = time.monotonic() + 0.05
        late = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2))}, deadline=deadline))
        # The compute stays blocked until the deadline has passed, however slow the machine.
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        compute.release.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await late
        await batcher.stop()

    asyncio.run(scenario())
    assert len(compute.calls) == 1
    assert recorder.expired_count == 1


def test_cancelled_request_leaves_the_queue() -> None:
    compute, recorder = GatedCompute(gate_first=True), Recorder()

    async def scenario() -> None:
        batcher = make_batcher(compute, recorder, max_batch=1, delay_s=0)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 2))}))
        await _wait_started(compute)
        doomed = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2))}))
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 1
        doomed.cancel()
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 0
        compute.release.set()
        await first
        await batcher.stop()

    asyncio.run(scenario())
    assert len(compute.calls) == 1


def test_full_queue_rejects_at_once() -> None:
    compute, recorder = GatedCompute(gate_first=True), Recorder()

    async def scenario() -> None:
        batcher = make_batcher(compute, recorder, max_batch=1, delay_s=0, queue=2)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 2))}))
        await _wait_started(compute)
        queued = [asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 2))})) for _ in range(2)]
        await asyncio.sleep(0.01)
        # "At once": refused while the compute is still blocked, so it cannot have waited for
        # room in the queue (the timeout only turns a hang into a failure).
        with pytest.raises(Overloaded):
            await asyncio.wait_for(batcher.submit({"x": np.zeros((1, 2))}), timeout=30)
        assert not compute.release.is_set()
        compute.release.set()
        await asyncio.gather(running, *queued)
        await batcher.stop()

    asyncio.run(scenario())
