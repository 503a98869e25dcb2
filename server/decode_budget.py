"""The memory all image decodes may hold at once, shared by every decode worker.

Each decode reserves what its header says it will hold (``preprocess.decode_memory``: the
decoded pixels in the file's mode plus the RGB image) before a pixel is decoded, and gives it
back when the decode ends. A decode that cannot get its share within a bounded wait is
refused with ``Overloaded`` (the client backs off and retries); an image that alone costs
more than the whole budget is refused with ``InvalidInput``, since no wait would help it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import InvalidInput, Overloaded

MIB = 1024 * 1024


class DecodeMemoryBudget:
    """A semaphore counted in bytes: a condition and the bytes reserved now.

    Reservations are taken in the decode threads, so they block the thread, not the loop.
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError(f"limit_bytes must be >= 1, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self._reserved = 0
        self._peak = 0
        self._changed = threading.Condition()

    @property
    def reserved(self) -> int:
        """Bytes held by decodes now."""
        with self._changed:
            return self._reserved

    @property
    def peak(self) -> int:
        """The most bytes held at once since the budget was made."""
        with self._changed:
            return self._peak

    @contextmanager
    def reserved_for(self, cost: int, where: str, wait_s: float) -> Iterator[None]:
        """Hold ``cost`` bytes for the duration of the block, waiting ``wait_s`` at most.

        Raises:
            InvalidInput: ``cost`` alone is over the budget.
            Overloaded: the bytes did not come free within ``wait_s``.
        """
        self._reserve(cost, where, wait_s)
        try:
            yield
        finally:
            self._release(cost)

    def _reserve(self, cost: int, where: str, wait_s: float) -> None:
        if cost > self.limit_bytes:
            raise InvalidInput(
                f"{where} needs {cost / MIB:.0f} MiB to decode; the limit "
                f"(max_decode_memory_mb) is {self.limit_bytes / MIB:.0f} MiB"
            )
        give_up = time.monotonic() + wait_s
        with self._changed:
            while self._reserved + cost > self.limit_bytes:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise Overloaded(
                        f"{where} needs {cost / MIB:.0f} MiB to decode and the decode memory "
                        f"budget (max_decode_memory_mb, {self.limit_bytes / MIB:.0f} MiB) "
                        f"stayed full for {wait_s:g} s; retry after a short backoff"
                    )
                self._changed.wait(left)
            self._reserved += cost
            self._peak = max(self._peak, self._reserved)

    def _release(self, cost: int) -> None:
        with self._changed:
            self._reserved -= cost
            self._changed.notify_all()
