"""SIGTERM under load against a real server process, and hot reload under load."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_helpers import infer_async
from repository_factory import make_model_repository, write_version
from server_harness import RunningServer, server_config

from protocol.inference import grpc_service_pb2_grpc as pb_grpc
from server.lifecycle import ServerState

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``python -m server.cli`` with its stderr collected; the bound port read from the log."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *args],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "serving models" in line:
                self._ready.set()

    def wait_ready(self, timeout: float = 60) -> int:
        if not self._ready.wait(timeout):
            self.process.kill()
            raise AssertionError("server did not start:\n" + "".join(self.lines))
        for line in self.lines:
            match = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", line)
            if match:
                return int(match.group(1))
        raise AssertionError("no port in the log:\n" + "".join(self.lines))


def test_sigterm_under_load_completes_accepted_requests(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", input_size=(64, 64), slow_layers=2)
    server = ServerProcess(
        "--model-repository", str(repo), "--host", "127.0.0.1", "--grpc-port", "0",
        "--http-port", "-1", "--metrics-port", "-1", "--poll-interval-s", "0",
        "--drain-delay-s", "1.5",
        "--grace-period-s", "10", "--intra-op-threads", "1",
    )  # fmt: skip
    port = server.wait_ready()
    images = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    results: list[tuple[float, object]] = []

    async def load() -> float:
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def worker() -> None:
                # Like a client behind a load balancer: UNAVAILABLE sends it elsewhere.
                while not stop.is_set():
                    sent = time.monotonic()
                    result = await infer_async(stub, images, timeout=15)
                    results.append((sent, result))
                    if result is grpc.StatusCode.UNAVAILABLE:
                        return

            tasks = [asyncio.ensure_future(worker()) for _ in range(8)]
            await asyncio.sleep(0.8)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            # One request sent as soon as the drain has begun arrives inside its delay however
            # slow the machine: the workers' next requests wait for their answers, which a
            # busy machine may not give within it.
            deadline = time.monotonic() + 30
            while not any("draining: health NOT_SERVING" in line for line in server.lines):
                assert time.monotonic() < deadline, "".join(server.lines)
                await asyncio.sleep(0.01)
            inside_sent = time.monotonic()
            inside = await infer_async(stub, images, timeout=15)
            results.append((inside_sent, inside))
            # Past the drain delay (1.5 s; generous so a busy machine still serves in it).
            await asyncio.sleep(max(0.0, signalled + 2.5 - time.monotonic()))
            stop.set()
            await asyncio.gather(*tasks)
        return signalled

    signalled = asyncio.run(load())
    assert server.process.wait(timeout=20) == 0, "".join(server.lines)
    before = [r for sent, r in results if sent < signalled]
    after = [r for sent, r in results if sent >= signalled]
    assert before and all(not isinstance(r, grpc.StatusCode) for r in before), before
    # After the signal: served during the drain delay, then refused as UNAVAILABLE; never lost.
    assert any(not isinstance(r, grpc.StatusCode) for r in after)
    codes = {r for r in after if isinstance(r, grpc.StatusCode)}
    assert codes <= {grpc.StatusCode.UNAVAILABLE}, codes


def test_the_quiet_time_before_the_stop_runs_from_the_last_answer() -> None:
    # A request computing longer than the quiet time: timed from its arrival, the transport
    # would stop as its answer leaves, and its client's next request would be cancelled.
    async def quiet_after_the_answer() -> float:
        state = ServerState()
        state.enter()
        await asyncio.sleep(0.3)
        answered = time.monotonic()
        state.exit()
        assert await state.wait_quiet(0.2, timeout=10)
        return time.monotonic() - answered

    assert asyncio.run(quiet_after_the_answer()) >= 0.2


def _version_of(result: object) -> str:
    assert not isinstance(result, grpc.StatusCode), result
    return result.model_version  # type: ignore[attr-defined]


def test_hot_reload_under_load(model_repository: Path) -> None:
    model_dir = model_repository / "classifier"
    config = server_config(model_repository, poll_interval_s=0.1)
    images = np.zeros((1, 32, 32, 3), dtype=np.uint8)

    async def load(server: RunningServer, change: object, until: object) -> list[object]:
        results: list[object] = []
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def worker() -> None:
                while not stop.is_set():
                    results.append(await infer_async(stub, images))

            tasks = [asyncio.ensure_future(worker()) for _ in range(4)]
            await asyncio.sleep(0.3)
            change()  # type: ignore[operator]
            deadline = time.monotonic() + 20
            while not until() and time.monotonic() < deadline:  # type: ignore[operator]
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)
        return results

    with RunningServer(config) as server:
        results = asyncio.run(
            load(
                server,
                lambda: write_version(model_dir, 2),
                lambda: server.sample("model_loads_total", {"model": "classifier"}) == 2,
            )
        )
        versions = [_version_of(r) for r in results]  # asserts zero failures
        assert versions[0] == "1" and versions[-1] == "2"
        assert versions.index("2") > 0

        results = asyncio.run(
            load(
                server,
                lambda: write_version(model_dir, 3, corrupt=True),
                lambda: server.sample("model_load_failures_total", {"model": "classifier"}) == 1,
            )
        )
        assert server.sample("model_load_failures_total", {"model": "classifier"}) == 1
        assert {_version_of(r) for r in results} == {"2"}
