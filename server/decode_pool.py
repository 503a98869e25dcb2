"""A bounded pool that decodes the images of Classify requests off the event loop.

The queue is bounded in images, not requests: a request whose images do not all fit is refused
at once with ``Overloaded`` (RESOURCE_EXHAUSTED), before any of them is decoded, so a burst of
large requests cannot pile up memory and latency behind the decode threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np

from contracts.preprocessing import Preprocessing
from server.errors import Overloaded
from server.preprocess import ImageLimits, decode_image


class DecodePool:
    """Decodes images on ``executor`` with at most ``max_pending`` images waiting or running.

    Counted on the event loop thread only, so no lock is needed.
    """

    def __init__(self, executor: Executor, max_pending: int) -> None:
        self.executor = executor
        self.max_pending = max_pending
        self.pending = 0

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
            InvalidInput: from ``decode_image``, naming the first bad image.
        """
        count = len(images)
        if self.pending + count > self.max_pending:
            raise Overloaded(
                f"the image decode queue is full ({self.pending} of {self.max_pending} images "
                "waiting); retry after a short backoff"
            )
        self.pending += count
        loop = asyncio.get_running_loop()
        futures = [
            loop.run_in_executor(
                self.executor, decode_image, data, index, spec, input_format, limits
            )
            for index, data in enumerate(images)
        ]
        try:
            arrays = await asyncio.gather(*futures)
        finally:
            self.pending -= count
        return np.stack(arrays)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False)
