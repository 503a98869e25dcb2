"""The memory that ModelInfer requests may hold at once, reserved before any is spent."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from server.errors import MessageTooLarge, Overloaded


class ByteBudget:
    """Reservations of estimated bytes against ``limit`` (``max_inflight_input_bytes``).

    Used on the event loop only, so reservations need no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reserved = 0

    @contextlib.contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        """Hold ``size`` bytes for the block.

        Raises:
            MessageTooLarge: ``size`` alone is over the limit (not worth retrying).
            Overloaded: it does not fit beside what is held now (retry shortly).
        """
        if size > self.limit:
            raise MessageTooLarge(
                f"converting this request's inputs would take about {size} bytes; the limit "
                f"(max_inflight_input_bytes) is {self.limit}"
            )
        if self.reserved + size > self.limit:
            raise Overloaded(
                f"requests in flight hold {self.reserved} of {self.limit} bytes of inputs "
                "(max_inflight_input_bytes); retry shortly"
            )
        self.reserved += size
        try:
            yield
        finally:
            self.reserved -= size
