"""The RPC deadline as a ``time.monotonic()`` value the handlers and the batcher compare."""

from __future__ import annotations

import time

import grpc


def deadline_of(context: grpc.aio.ServicerContext, timeout_us: int | None = None) -> float | None:
    """The RPC's deadline (and the OIP ``timeout`` parameter, in us) as a monotonic time."""
    remaining = context.time_remaining()
    candidates = []
    if remaining is not None:
        candidates.append(remaining)
    if timeout_us is not None and timeout_us > 0:
        candidates.append(timeout_us / 1e6)
    return time.monotonic() + min(candidates) if candidates else None
