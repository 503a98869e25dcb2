"""Graceful shutdown.

On SIGTERM: health turns NOT_SERVING at once; the server keeps serving for ``drain_delay_s``
(Kubernetes needs that long to take the pod out of the Service's endpoints); then the gate
interceptor answers new inference RPCs with UNAVAILABLE itself; every accepted request is
finished within ``grace_period_s``; only then is the gRPC server stopped.

The pitfall this avoids: grpc.aio's ``server.stop(grace)`` cancels calls that have arrived but
were not yet handed to a handler, and they reach the client as CANCELLED -- lost requests.
Rejecting new work ourselves first, and stopping only once nothing is in flight, turns those
into UNAVAILABLE answers a client can retry elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger(__name__)

# How long after the last inference RPC arrived or was answered the transport is stopped: a
# client that has just had its answer gets this long to send its next request, which the gate
# refuses with UNAVAILABLE rather than the stop cancelling it.
QUIET_S = 0.2


class ServerState:
    """Shared between the interceptors and the drain sequence."""

    def __init__(self) -> None:
        self.rejecting = False
        self.active = 0
        self.last_change = 0.0  # when a tracked RPC last arrived or finished
        self._idle: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.active == 0:
                self._idle.set()
        return self._idle

    def enter(self) -> None:
        self.active += 1
        self.last_change = time.monotonic()
        self._event().clear()

    def exit(self) -> None:
        self.active -= 1
        self.last_change = time.monotonic()
        if self.active == 0:
            self._event().set()

    async def wait_quiet(self, quiet_s: float, timeout: float) -> bool:
        """Wait until nothing is running and nothing arrived or finished for quiet_s seconds.

        Timed from the last answer too: when a long request finishes after the quiet time since
        it arrived, its client's next request is on its way now.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not await self.wait_idle(deadline - time.monotonic()):
                return False
            since = time.monotonic() - self.last_change
            if since >= quiet_s:
                return True
            if time.monotonic() + (quiet_s - since) > deadline:
                return False
            await asyncio.sleep(quiet_s - since)

    async def wait_idle(self, timeout: float) -> bool:
        """True when no tracked RPC is running; False if the timeout came first."""
        try:
            await asyncio.wait_for(self._event().wait(), timeout=max(timeout, 0.0))
        except TimeoutError:
            return False
        return True


async def drain(handle: DrainTarget, *, drain_delay_s: float, grace_period_s: float) -> None:
    """Run the shutdown sequence described in the module docstring."""
    started = time.monotonic()
    state = handle.state
    await handle.set_not_serving()
    log.info("draining: health NOT_SERVING, still serving for %.1fs", drain_delay_s)
    await asyncio.sleep(drain_delay_s)
    state.rejecting = True
    remaining = grace_period_s - (time.monotonic() - started) + drain_delay_s
    log.info("draining: rejecting new requests, %d in flight", state.active)
    # Stop only once nothing is running and clients have stopped arriving (they were told
    # UNAVAILABLE), so that server.stop() has no undispatched call left to cancel.
    if not await state.wait_quiet(QUIET_S, remaining):
        log.warning("grace period over with %d request(s) still running", state.active)
    await handle.stop_transport(grace=0.5)
    await handle.unload_models()
    log.info("drained in %.2fs", time.monotonic() - started)


class DrainTarget:
    """What drain needs from the running server (implemented by server.app.ServerHandle)."""

    state: ServerState

    async def set_not_serving(self) -> None:
        raise NotImplementedError

    async def stop_transport(self, grace: float) -> None:
        raise NotImplementedError

    async def unload_models(self) -> None:
        raise NotImplementedError
