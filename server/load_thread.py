"""A version's load in a daemon thread of its own, cancellable between its steps.

The load runs in a daemon thread of its own, not in the loop's default executor: a cancelled
load keeps its thread until the step it is in ends (onnxruntime cannot be interrupted), and
``asyncio.run`` joins the default executor's threads at exit, so a SIGTERM during a warm-up
would otherwise wait for the whole warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

from server.onnx_sessions import OnnxSessions

T = TypeVar("T")


class LoadCancelled(Exception):  # noqa: N818 (names of the domain)
    """The load was cancelled between two steps (the server is shutting down)."""


async def run_in_daemon_thread(function: Callable[[], T], name: str) -> T:
    """``await function()`` run in a new daemon thread that nobody joins.

    Cancelling the await returns at once; the thread finishes its step on its own, and a
    process exiting meanwhile does not wait for it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (function(), None)
        except BaseException as error:  # delivered to the awaiting task, which decides
            outcome = (None, error)
        # The loop may be closed already (the process is exiting): nobody waits any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, *outcome)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future


class LoadControl:
    """How the event loop stops one load running in its thread, and learns that it ended."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()
        self.finished = threading.Event()
        self._sessions: OnnxSessions | None = None

    def cancel(self) -> None:
        """Stop at the next step; a run in progress (a warm-up batch) stops within a kernel."""
        self._cancelled.set()
        sessions = self._sessions
        if sessions is not None:
            sessions.terminate()

    def checkpoint(self) -> None:
        """Raises LoadCancelled once ``cancel()`` was called (in the load's thread)."""
        if self._cancelled.is_set():
            raise LoadCancelled("cancelled")

    def started(self, sessions: OnnxSessions) -> None:
        """The load's sessions exist: from now on ``cancel()`` terminates their runs."""
        self._sessions = sessions
        self.checkpoint()  # a cancel() that came before the line above found no sessions
