# ruff: noqa: N802 (gRPC method names are fixed by the .proto)
"""``grpc.health.v1.Health``: Check, and Watch streams that are capped in number and lifetime.

Written here rather than taken from grpcio-health-checking: its servicer keeps one condition
per service and deletes it when any watcher of that service leaves, so the watchers still
open wait on an orphaned condition and never see another change -- not even the NOT_SERVING
of a drain. Here each watcher has its own queue of changes.

Watch streams are bounded because they are exempt from auth and the RPC limit (probes must
always get through): at most ``max_watches`` at once (beyond: RESOURCE_EXHAUSTED), each ended
with OK after ``watch_max_s`` (clients watch again; a connection that rebalanced meanwhile
takes the new watch elsewhere).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The status of each service, Check, and Watch with one queue per watcher."""

    def __init__(self, max_watches: int, watch_max_s: float) -> None:
        """
        Args:
            max_watches: Watch streams open at once, over every port this servicer is on.
            watch_max_s: a Watch stream ends after this long (0: never).
        """
        self.max_watches = max_watches
        self.watch_max_s = watch_max_s
        self._statuses: dict[str, int] = {}
        self._watchers: dict[str, set[asyncio.Queue[int]]] = {}
        self._shutting_down = False

    @property
    def watching(self) -> int:
        """Watch streams open now."""
        return sum(len(queues) for queues in self._watchers.values())

    def set(self, service: str, status: int) -> None:
        """Set a service's status and tell each of its watchers; ignored once shutting down."""
        if not self._shutting_down:
            self._set(service, status)

    def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service, and no later change."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in list(self._statuses):
            self._set(service, NOT_SERVING)

    def _set(self, service: str, status: int) -> None:
        self._statuses[service] = status
        for queue in self._watchers.get(service, ()):
            queue.put_nowait(status)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if self.watching >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.watching} health watches open; the limit (max_health_watches) is "
                f"{self.max_watches}",
            )
        service = request.service
        queue: asyncio.Queue[int] = asyncio.Queue()
        self._watchers.setdefault(service, set()).add(queue)
        ends = time.monotonic() + self.watch_max_s if self.watch_max_s > 0 else None
        try:
            last = self._statuses.get(service, SERVICE_UNKNOWN)
            yield health_pb2.HealthCheckResponse(status=last)
            while True:
                timeout = None if ends is None else ends - time.monotonic()
                if timeout is not None and timeout <= 0:
                    return
                try:
                    status = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    return
                if status != last:  # a watcher wants the latest status, not every repeat
                    last = status
                    yield health_pb2.HealthCheckResponse(status=status)
        finally:
            watchers = self._watchers[service]
            watchers.discard(queue)
            if not watchers:
                del self._watchers[service]
