"""Keeping a real server's one model instance busy, confirmed by its own metrics, not by time.

Tests of what happens to a request that arrives while the server is busy (deadlines in the
queue, cancellation, the concurrent-RPC limit, the byte budget, a full queue) first make it
busy with requests of a deliberately slow model, wait until the metrics show every one of them
inside the batcher, then send the request under test. The waits are on the server's state and
are generous; what keeps the state long enough to observe is that several busy requests queue
behind one another, so no margin depends on how loaded the machine is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_helpers import infer_request
from repository_factory import make_model_repository
from server_harness import RunningServer

LABELS = {"model": "classifier", "version": "1"}
# Rows of one busy request: about 2 s of compute on an idle core (12 slow layers at 64 px),
# longer on a loaded one. The server's max_batch_size must be BUSY_ROWS, so that two busy
# requests never share a batch and each one is a full compute of its own.
BUSY_ROWS = 16
BUSY_BYTES = BUSY_ROWS * 64 * 64 * 3
WAIT_S = 120.0


def make_slow_repository(directory: Path) -> Path:
    """A 64 px model with slow layers and no queue delay (each request its own batch)."""
    return make_model_repository(
        directory, input_size=(64, 64), slow_layers=12, max_queue_delay_us=0
    )


def busy_images() -> np.ndarray:
    return np.zeros((BUSY_ROWS, 64, 64, 3), dtype=np.uint8)


def one_image(value: int = 1) -> np.ndarray:
    return np.full((1, 64, 64, 3), value, dtype=np.uint8)


def wait_for(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    """Poll until ``condition()`` holds; fail after a generous ``timeout``."""
    limit = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < limit, "condition not reached"
        time.sleep(0.005)


def busy_done(server: RunningServer) -> int:
    """Busy requests computed so far (only busy requests may have run)."""
    return int(server.sample("inference_rows_total", LABELS)) // BUSY_ROWS


def occupy(server: RunningServer, stub: Any, count: int, *, max_done: int) -> list[grpc.Future]:
    """Send ``count`` busy requests; return once all of them are in the batcher, one computing
    and the others queued, with at most ``max_done`` already computed.

    The state lasts until the last busy request is taken, (count - max_done - 1) full computes
    at least, so a request sent now has that many busy requests ahead of it.
    """
    # The first one alone, until the batcher's worker has taken it: requests that arrive in
    # the same turn of the event loop all reach the queue before the worker takes any, and a
    # small max_queue_size would refuse the last of them.
    futures = [stub.ModelInfer.future(infer_request(busy_images()), timeout=600)]

    def first_computing() -> bool:
        depth = server.registry.get_sample_value("inference_queue_depth", LABELS)
        return server.sample("inference_inflight_requests") == 1 and depth == 0

    wait_for(first_computing)
    futures += [
        stub.ModelInfer.future(infer_request(busy_images()), timeout=600) for _ in range(count - 1)
    ]

    def all_inside() -> bool:
        done = busy_done(server)
        inflight = server.sample("inference_inflight_requests")
        depth = server.registry.get_sample_value("inference_queue_depth", LABELS)
        unchanged = busy_done(server) == done  # no batch finished between the reads
        return (
            unchanged
            and done <= max_done
            and inflight == count - done
            and depth is not None  # a request has been queued: the gauge exists
            and depth == count - done - 1
        )

    wait_for(all_inside)
    return futures


def arrived(server: RunningServer, count: int, *, max_done: int) -> Callable[[], bool]:
    """Condition: ``count`` requests reached the handler (busy ones computed included), with at
    most ``max_done`` busy requests computed."""

    def condition() -> bool:
        done = busy_done(server)
        inflight = server.sample("inference_inflight_requests")
        return busy_done(server) == done <= max_done and inflight + done == count

    return condition
