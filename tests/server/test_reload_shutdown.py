"""A load in progress never holds up a shutdown nor a restart (real server processes).

SIGTERM during a slow reload: the load is cancelled between steps and nobody waits for its
thread, so the process exits within the drain time. A process that dies while loading a
version (killed for memory in its warm-up, say) leaves the version's loading marker, and the
next start skips that version and serves the previous one instead of dying on it again.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import tritonclient.grpc as triton
from repository_factory import make_model_repository, write_version
from test_lifecycle import ServerProcess

from server.config import FIELDS

# Version 2 warms up at batch sizes 1-16 of 64 px images through 12 slow convolutions: about
# 30 s of compute on an idle core, far longer than the drain below.
SLOW_LAYERS = 12
INPUT_SIZE = (64, 64)
DRAIN_DELAY_S = 0.5
GRACE_PERIOD_S = 10.0
WAIT_S = 120.0
LISTENERS = ("metrics_port", "http_port", "health_port")


def _start(repository: Path, state: Path) -> tuple[ServerProcess, int]:
    # Every listener but gRPC off: a fixed default port would collide between tests.
    others = [f"--{name.replace('_', '-')}=-1" for name in LISTENERS if name in FIELDS]
    server = ServerProcess(
        "--model-repository", str(repository), "--host", "127.0.0.1", "--grpc-port", "0",
        *others, "--poll-interval-s", "0.2", "--intra-op-threads", "1",
        "--drain-delay-s", str(DRAIN_DELAY_S), "--grace-period-s", str(GRACE_PERIOD_S),
        "--state-dir", str(state),
    )  # fmt: skip
    return server, server.wait_ready()


def _index(port: int) -> dict[str, tuple[str, str]]:
    """version -> (state, reason) of the model ``classifier``, via RepositoryIndex."""
    response = triton.InferenceServerClient(f"127.0.0.1:{port}").get_model_repository_index()
    return {m.version: (m.state, m.reason) for m in response.models if m.name == "classifier"}


def _wait_until_loading(port: int, version: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while _index(port).get(version, ("", ""))[0] != "LOADING":
        assert time.monotonic() < deadline, f"version {version} never started loading"
        time.sleep(0.05)


def _stop(server: ServerProcess) -> str:
    """Ends the process if it still runs; returns everything it logged."""
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(timeout=30)
    server._reader.join(timeout=10)
    return "".join(server.lines)


def _repository_with_a_slow_version_coming(tmp_path: Path) -> Path:
    return make_model_repository(tmp_path / "models", input_size=INPUT_SIZE)


def test_sigterm_during_a_slow_reload_exits_within_the_drain_time(tmp_path: Path) -> None:
    repository = _repository_with_a_slow_version_coming(tmp_path)
    state = tmp_path / "state"
    server, port = _start(repository, state)
    try:
        write_version(repository / "classifier", 2, input_size=INPUT_SIZE, slow_layers=SLOW_LAYERS)
        _wait_until_loading(port, "2")
        time.sleep(1.0)  # into its warm-up
        assert (state / "classifier" / "2.loading").is_file()  # marked while it loads
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            code = None
        exited_after = time.monotonic() - signalled
    finally:
        log = _stop(server)
    assert code == 0, log
    # The drain itself takes the drain delay and a fraction of a second; the bound is the
    # whole drain time, still a third of the warm-up it no longer waits for.
    assert exited_after < DRAIN_DELAY_S + GRACE_PERIOD_S, (exited_after, log)
    assert "model classifier version 2: load cancelled" in log
    assert "terminate called" not in log  # no thread was left inside onnxruntime at exit
    # A shutdown is no crash: the next start loads version 2 again.
    assert list(state.rglob("*.loading")) == []


def test_a_version_a_server_died_loading_is_skipped_at_the_next_start(tmp_path: Path) -> None:
    repository = _repository_with_a_slow_version_coming(tmp_path)
    state = tmp_path / "state"
    server, port = _start(repository, state)
    try:
        write_version(repository / "classifier", 2, input_size=INPUT_SIZE, slow_layers=SLOW_LAYERS)
        _wait_until_loading(port, "2")
        server.process.kill()  # as the OOM killer would, in the middle of the warm-up
        server.process.wait(timeout=30)
    finally:
        _stop(server)
    marker = state / "classifier" / "2.loading"
    assert marker.is_file()

    restarted, port = _start(repository, state)
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.get_model_metadata("classifier").versions == ["1"]
        index = _index(port)
        time.sleep(0.5)  # a few polls: it is not tried again either
        assert _index(port) == index
    finally:
        restarted.process.send_signal(signal.SIGTERM)
        restarted.process.wait(timeout=WAIT_S)
        log = _stop(restarted)
    assert index["1"] == ("READY", "")
    state_2, reason = index["2"]
    assert state_2 == "UNAVAILABLE"
    assert "died while loading this version" in reason
    assert f"skipped until its files change or {marker} is deleted" in reason
    assert "died while loading this version" in log
    assert "no version selected by the policy loads; serving version 1" in log
    assert marker.is_file()  # the record stays: the next start skips it too
