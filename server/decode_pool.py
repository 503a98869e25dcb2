"""A bounded pool that decodes the images of Classify requests off the event loop.

The queue is bounded in images, not requests: a request whose images do not all fit is refused
at once with ``Overloaded`` (RESOURCE_EXHAUSTED), before any of them is decoded, so a burst of
large requests cannot pile up memory and latency behind the decode threads. An image counts
until its decode really ends: when one image of a request fails, its siblings that have not
started are cancelled, and the ones already running keep their place in the count until they
finish (a running decode cannot be stopped), so a failed request frees exactly what it no
longer uses.

Each image's decode first reads its header for what it will hold and reserves that from the
decode memory budget (``server.decode_budget``), shared by all workers. With worker
processes (``server.decode_processes``) a decode is also stopped at its deadline; the
queue, the count and the cancelling of siblings are the same in both modes, since the decode
threads drive the processes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future

import numpy as np

from contracts.preprocessing import Preprocessing
from server.decode_budget import DecodeMemoryBudget
from server.decode_processes import DecodeProcesses
from server.errors import Overloaded
from server.preprocess import ImageLimits, decode_image, decode_memory

# Longest wait for decode memory when no other wait is given.
MEMORY_WAIT_S = 5.0


class DecodePool:
    """Decodes images on ``executor`` with at most ``max_pending`` images waiting or running.

    The count is raised on the event loop and lowered by each decode's end, in whichever
    thread that happens, so it is guarded by a lock.
    """

    def __init__(
        self,
        executor: Executor,
        max_pending: int,
        budget: DecodeMemoryBudget | None = None,
        processes: DecodeProcesses | None = None,
        memory_wait_s: float = MEMORY_WAIT_S,
    ) -> None:
        """
        Args:
            executor: the decode threads; with ``processes``, each drives one worker.
            max_pending: images waiting or decoding at most.
            budget: the decode memory shared by all decodes (None: not counted).
            processes: decode in these worker processes, each stopped at its deadline
                (None: in the executor's threads, which cannot be stopped).
            memory_wait_s: how long one image may wait for its decode memory.
        """
        self.executor = executor
        self.max_pending = max_pending
        self.budget = budget
        self.processes = processes
        self.memory_wait_s = memory_wait_s
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Images queued or decoding now."""
        with self._lock:
            return self._pending

    async def decode(
        self,
        images: Sequence[bytes],
        spec: Preprocessing,
        input_format: str,
        limits: ImageLimits,
    ) -> np.ndarray:
        """Decode every image in the pool and stack them into one batch.

        Raises:
            Overloaded: the images do not fit in the queue now.
            InvalidInput: from ``decode_image``, naming the first bad image; the request's
                other images that have not started are cancelled.
        """
        count = len(images)
        with self._lock:
            if self._pending + count > self.max_pending:
                raise Overloaded(
                    f"the image decode queue is full ({self._pending} of {self.max_pending} "
                    "images waiting); retry after a short backoff"
                )
            self._pending += count
        jobs = []
        for index, data in enumerate(images):
            job = self.executor.submit(self._decode_one, data, index, spec, input_format, limits)
            # Runs when the decode ends, or at once when it is cancelled before starting.
            job.add_done_callback(self._one_ended)
            jobs.append(job)
        try:
            arrays = await asyncio.gather(*(asyncio.wrap_future(job) for job in jobs))
        except BaseException:
            for job in jobs:
                job.cancel()  # only the ones not started; running ones end on their own
            raise
        return np.stack(arrays)

    def _decode_one(
        self,
        data: bytes,
        index: int,
        spec: Preprocessing,
        input_format: str,
        limits: ImageLimits,
    ) -> np.ndarray:
        if self.budget is None:
            return self._run(data, index, spec, input_format, limits)
        cost = decode_memory(data, index, spec, limits)
        with self.budget.reserved_for(cost, f"images[{index}]", self.memory_wait_s):
            return self._run(data, index, spec, input_format, limits)

    def _run(
        self,
        data: bytes,
        index: int,
        spec: Preprocessing,
        input_format: str,
        limits: ImageLimits,
    ) -> np.ndarray:
        if self.processes is None:
            return decode_image(data, index, spec, input_format, limits)
        return self.processes.decode(data, index, spec, input_format, limits)

    def _one_ended(self, _job: Future[np.ndarray]) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        """Stop taking decodes and end the worker processes (none is left behind)."""
        self.executor.shutdown(wait=False)
        if self.processes is not None:
            self.processes.shutdown()
