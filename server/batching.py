"""Dynamic batching, in the manner of Triton's dynamic batcher.

Requests wait in a bounded queue. A worker takes the oldest request and then keeps adding
compatible requests until ``max_batch_size`` items are gathered or ``max_queue_delay`` has
passed since the oldest one arrived. The batch is concatenated along the first axis, computed
off the event loop, and split back so every caller gets exactly its own rows.

Requests whose deadline has passed are failed before compute; a caller that is cancelled leaves
the queue; a failed batch fails every request in it with the cause. One worker runs per model
instance so instances compute in parallel. This module knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from server.errors import DeadlineExceeded, InvalidInput, Overloaded, ServerError, ShuttingDown

log = logging.getLogger(__name__)

RunBatch = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class BatchingSettings:
    """max_batch_size 1 turns batching off; 0 means the model has no batch dimension."""

    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int
    workers: int = 1
    # Bytes of inputs admitted and not yet answered (queued or computing); 0: no limit.
    max_queued_bytes: int = 0


@dataclass(frozen=True)
class BatchResult:
    """One request's own outputs and the phases of the batch that computed them.

    The phase durations are the batch's, as Triton attributes them to every request in it:
    ``input_s`` gathers the requests' inputs into one batch, ``infer_s`` runs the model,
    ``output_s`` splits the outputs back.
    """

    outputs: dict[str, np.ndarray]
    queue_s: float
    input_s: float
    infer_s: float
    output_s: float
    batch_size: int

    @property
    def compute_s(self) -> float:
        return self.input_s + self.infer_s + self.output_s


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def queue_depth(self, depth: int) -> None:
        """Called whenever the queue length changes."""

    def batch_done(self, batch_size: int, request_count: int, compute_s: float) -> None:
        """Called after each executed batch (successful or not)."""

    def expired(self) -> None:
        """Called for each request dropped because its deadline passed in the queue."""


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    signature: tuple
    future: asyncio.Future[BatchResult]
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)

    def is_expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


def _signature(inputs: Mapping[str, np.ndarray]) -> tuple:
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


class DynamicBatcher:
    """Batches concurrent ``submit`` calls into ``run_batch`` calls."""

    def __init__(
        self,
        run_batch: RunBatch,
        settings: BatchingSettings,
        executor: Executor,
        observer: BatchObserver | None = None,
        upstream: Callable[[], int] | None = None,
    ) -> None:
        """
        Args:
            run_batch: computes one batch; called in ``executor``.
            upstream: how many requests are on their way to ``submit`` (e.g. being decoded).
                The batcher waits for more requests only while this is positive, so a lone
                request is not held for ``max_queue_delay`` waiting for company that cannot
                come. Without it the batcher always waits up to the delay, as Triton does.
        """
        self._run_batch = run_batch
        self.settings = settings
        self._executor = executor
        self._observer = observer or BatchObserver()
        self._upstream = upstream
        # Loop-bound objects are created in start(), on the running loop.
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrival: asyncio.Future[None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._closed = True
        self._admitted_bytes = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._arrival = loop.create_future()
        self._closed = False
        self._workers = [
            loop.create_task(self._work(), name=f"batcher-{i}")
            for i in range(max(self.settings.workers, 1))
        ]

    async def submit(
        self, inputs: dict[str, np.ndarray], deadline: float | None = None
    ) -> BatchResult:
        """Queue one request and wait for its own outputs.

        Args:
            inputs: arrays sharing the first (batch) dimension, unless the model has none.
            deadline: ``time.monotonic()`` value after which the request is not computed.

        Raises:
            Overloaded: the queue is full. ShuttingDown: the batcher is stopping.
            DeadlineExceeded: the deadline passed while the request waited.
        """
        if self._closed or self._arrival is None:
            raise ShuttingDown("the model version is being unloaded")
        if len(self._queue) >= self.settings.max_queue_size:
            raise Overloaded(f"request queue is full ({self.settings.max_queue_size} waiting)")
        size = sum(a.nbytes for a in inputs.values())
        self._admit(size)
        try:
            return await self._submit(inputs, deadline)
        finally:
            self._admitted_bytes -= size

    def _admit(self, size: int) -> None:
        budget = self.settings.max_queued_bytes
        if budget and self._admitted_bytes + size > budget and self._admitted_bytes:
            raise Overloaded(
                f"queued inputs are over the byte budget ({self._admitted_bytes} of {budget} "
                f"bytes in use, this request needs {size}); retry after a short backoff"
            )
        self._admitted_bytes += size

    async def _submit(self, inputs: dict[str, np.ndarray], deadline: float | None) -> BatchResult:
        rows = 1
        if self.settings.max_batch_size > 0:
            sizes = {a.shape[0] if a.ndim else -1 for a in inputs.values()}
            if len(sizes) != 1 or -1 in sizes:
                raise InvalidInput("all inputs must share the same batch dimension")
            rows = sizes.pop()
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, rows, _signature(inputs), loop.create_future(), deadline)
        self._queue.append(pending)
        self._observer.queue_depth(len(self._queue))
        self._notify()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller went away: leave the queue (a running batch just discards the rows).
            with contextlib.suppress(ValueError):
                self._queue.remove(pending)
                self._observer.queue_depth(len(self._queue))
            raise

    def _notify(self) -> None:
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    async def _wait_for_arrival(self, timeout: float | None) -> None:
        if self._arrival is None or self._arrival.done():
            self._arrival = asyncio.get_running_loop().create_future()
        await asyncio.wait({self._arrival}, timeout=timeout)

    def _take_first(self) -> _Pending | None:
        now = time.monotonic()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.is_expired(now):
                self._expire(item)
                continue
            return item
        return None

    def _expire(self, item: _Pending) -> None:
        self._observer.expired()
        if not item.future.done():
            item.future.set_exception(DeadlineExceeded("deadline passed while queued"))

    def _take_compatible(self, batch: list[_Pending], rows: int) -> int:
        """Move queued requests that fit and match the first request's shapes into batch."""
        limit = self.settings.max_batch_size
        signature = batch[0].signature
        index = 0
        while index < len(self._queue) and rows < limit:
            item = self._queue[index]
            if item.future.done():
                del self._queue[index]
                continue
            if item.signature == signature and rows + item.rows <= limit:
                del self._queue[index]
                batch.append(item)
                rows += item.rows
                continue
            index += 1
        return rows

    async def _gather(self) -> list[_Pending] | None:
        while True:
            first = self._take_first()
            if first is not None:
                break
            if self._closed:
                return None
            await self._wait_for_arrival(None)
        batch = [first]
        if self.settings.max_batch_size <= 1:
            return batch
        rows = self._take_compatible(batch, first.rows)
        close_at = first.enqueued + self.settings.max_queue_delay_s
        while rows < self.settings.max_batch_size and not self._closed:
            remaining = close_at - time.monotonic()
            if remaining <= 0 or (self._upstream is not None and self._upstream() <= 0):
                break
            await self._wait_for_arrival(remaining)
            rows = self._take_compatible(batch, rows)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            self._observer.queue_depth(len(self._queue))
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for item in batch:
                if item.future.done():
                    continue
                if item.is_expired(now):
                    self._expire(item)
                else:
                    live.append(item)
            if not live:
                continue
            await self._execute(loop, live)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        started = time.monotonic()
        rows = sum(item.rows for item in batch)
        try:
            inputs = _concatenate(batch)
            computing = time.monotonic()
            outputs = await loop.run_in_executor(self._executor, self._run_batch, inputs)
        except Exception as error:
            self._observer.batch_done(rows, len(batch), time.monotonic() - started)
            if not isinstance(error, ServerError):
                log.exception("batch of %d request(s) failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        splitting = time.monotonic()
        own = _split(batch, outputs)
        finished = time.monotonic()
        self._observer.batch_done(rows, len(batch), finished - started)
        for item, item_outputs in zip(batch, own, strict=True):
            if not item.future.done():
                item.future.set_result(
                    BatchResult(
                        outputs=item_outputs,
                        queue_s=started - item.enqueued,
                        input_s=computing - started,
                        infer_s=splitting - computing,
                        output_s=finished - splitting,
                        batch_size=rows,
                    )
                )

    async def stop(self) -> None:
        """Stop accepting, finish everything queued and running, then end the workers."""
        self._closed = True
        self._notify()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []


def _concatenate(batch: list[_Pending]) -> dict[str, np.ndarray]:
    if len(batch) == 1:
        return batch[0].inputs
    return {name: np.concatenate([item.inputs[name] for item in batch]) for name in batch[0].inputs}


def _split(batch: list[_Pending], outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each request's own rows of the batch's outputs, in batch order."""
    if len(batch) == 1:
        return [outputs]
    result = []
    offset = 0
    for item in batch:
        result.append({n: v[offset : offset + item.rows] for n, v in outputs.items()})
        offset += item.rows
    return result
