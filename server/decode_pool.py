"""A bounded pool that decodes the images of Classify requests off the event loop.

The queue is bounded in images, not requests: a request whose images do not all fit is refused
at once with ``Overloaded`` (RESOURCE_EXHAUSTED), before any of them is decoded, so a burst of
large requests cannot pile up memory and latency behind the decode threads. An image counts
until its decode really ends: when one image of a request fails, its siblings that have not
started are cancelled, and the ones already running keep their place in the count until they
finish (a running decode cannot be stopped), so a failed request frees exactly what it no
longer uses.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future

import numpy as np

from contracts.preprocessing import Preprocessing
from server.errors import Overloaded
from server.preprocess import ImageLimits, decode_image


class DecodePool:
    """Decodes images on ``executor`` with at most ``max_pending`` images waiting or running.

    The count is raised on the event loop and lowered by each decode's end, in whichever
    thread that happens, so it is guarded by a lock.
    """

    def __init__(self, executor: Executor, max_pending: int) -> None:
        self.executor = executor
        self.max_pending = max_pending
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
            job = self.executor.submit(decode_image, data, index, spec, input_format, limits)
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

    def _one_ended(self, _job: Future[np.ndarray]) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False)
