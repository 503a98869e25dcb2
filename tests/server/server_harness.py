"""Runs a real server (server.app) on 127.0.0.1 with OS-chosen ports in a background thread.

The server's event loop lives in its own thread, so tests drive it with ordinary synchronous
clients (tritonclient.grpc, grpc stubs) from the test thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from server.app import ServerHandle, build_server
from server.config import ServerConfig

T = TypeVar("T")


def server_config(repository: Path, **overrides: Any) -> ServerConfig:
    """Settings for tests: loopback, port 0, no polling, no drain delay, small pools."""
    values: dict[str, Any] = {
        "model_repository": repository,
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": -1,  # the HTTP/REST tests turn it on (http_port=0)
        "metrics_port": -1,  # the metrics test turns it on; its HTTP shutdown costs 0.5 s
        "poll_interval_s": 0.0,
        "drain_delay_s": 0.0,
        "grace_period_s": 5.0,
        "intra_op_threads": 1,
        "preprocess_workers": 1,
    }
    values.update(overrides)
    return ServerConfig(**values)


class RunningServer:
    """A started server; ``port``/``http_port``/``metrics_port`` are the bound ports."""

    def __init__(self, config: ServerConfig, *, start_models: bool = True) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.handle: ServerHandle = self.call(build_server(config, self.registry))
        if start_models:
            self.call(self.handle.start())

    @property
    def port(self) -> int:
        return self.handle.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.handle.port}"

    @property
    def http_port(self) -> int:
        assert self.handle.rest is not None, "started without http_port"
        return self.handle.rest.port

    @property
    def metrics_port(self) -> int:
        assert self.handle.metrics_port is not None
        return self.handle.metrics_port

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return self.submit(coroutine).result(timeout)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's value from this server's registry (0 when absent)."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def stop(self) -> None:
        try:
            self.call(self.handle.stop(), timeout=30)
            self.call(_cancel_the_rest(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _cancel_the_rest() -> None:
    """Cancel the loop's remaining tasks, as ``asyncio.run`` does when ``serve`` returns (an
    HTTP connection still discarding the unread body of a refused request, for up to
    aiohttp's lingering time, would otherwise be destroyed pending when the loop closes)."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def replace(config: ServerConfig, **changes: Any) -> ServerConfig:
    return dataclasses.replace(config, **changes)


def test_config(repository: Path, **overrides: Any) -> ServerConfig:
    """Alias of server_config kept for modules that import it under this name."""
    return server_config(repository, **overrides)


# Not a test, although its name says so when a test module imports it.
test_config.__test__ = False  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class Seen:
    """When a polled change was first seen, and what polling cost.

    Attributes:
        after_s: from the start until the probe that saw it was sent: a probe's own latency
            is not counted, so a loaded host does not make a reload look slow.
        slowest_probe_s: the longest probe; the change can be seen that much (plus the poll
            pause) after it happened.
    """

    after_s: float
    slowest_probe_s: float

    def within(self, interval_s: float, slack_s: float = 0.35) -> bool:
        """Seen at the first file check after the change: one check interval, one probe and
        its pause, and ``slack_s`` for the reload itself."""
        return self.after_s < interval_s + self.slowest_probe_s + POLL_PAUSE_S + slack_s


POLL_PAUSE_S = 0.05


def seconds_until(condition: Callable[[], bool], within_s: float, what: str) -> Seen:
    """Polls ``condition`` until it holds; fails after ``within_s`` naming ``what``."""
    started = time.monotonic()
    slowest = 0.0
    while True:
        probe = time.monotonic()
        if condition():
            return Seen(probe - started, max(slowest, time.monotonic() - probe))
        slowest = max(slowest, time.monotonic() - probe)
        assert time.monotonic() - started < within_s, f"{what} was not seen in time"
        time.sleep(POLL_PAUSE_S)
