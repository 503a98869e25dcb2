"""Threads sized by the pod's CPU budget, and every batch size warm before serving."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config

from contracts.cpu_budget import CpuBudget
from server.config import ServerConfig
from server.errors import ConfigError
from server.thread_plan import plan_threads

ROOT = Path(__file__).resolve().parents[2]


def _budget(cpus: int, host: int) -> CpuBudget:
    return CpuBudget(cpus=cpus, affinity=host, quota=cpus, host_cpus=host, source="cgroup quota")


def test_plan_divides_the_budget_between_sessions() -> None:
    plan = plan_threads(_budget(4, 64), instances=2)
    assert (plan.intra_op_threads, plan.inter_op_threads, plan.decode_workers) == (2, 1, 4)
    assert plan.allow_spinning is False  # 4 of 64 cores: spinning would burn the quota
    assert "spinning off" in plan.describe()


def test_plan_gives_every_session_a_thread_and_spins_only_with_a_core_to_spare() -> None:
    plan = plan_threads(_budget(2, 2), instances=4)
    assert plan.intra_op_threads == 1
    assert plan.allow_spinning is False  # the sessions' threads take every core
    spare = plan_threads(_budget(4, 4), instances=1, intra_op_threads=3)
    assert spare.allow_spinning is True  # a whole machine, and a core left for the event loop


def test_explicit_settings_win_over_the_budget() -> None:
    plan = plan_threads(
        _budget(1, 8), instances=1, intra_op_threads=6, inter_op_threads=2, decode_workers=3
    )
    assert (plan.intra_op_threads, plan.inter_op_threads, plan.decode_workers) == (6, 2, 3)


def test_spinning_can_be_forced_either_way() -> None:
    assert plan_threads(_budget(1, 8), instances=1, spinning="on").allow_spinning is True
    assert plan_threads(_budget(2, 2), instances=1, spinning="off").allow_spinning is False
    assert plan_threads(_budget(2, 2), instances=1, spinning="auto").allow_spinning is False
    with pytest.raises(ValueError, match="spinning"):
        plan_threads(_budget(2, 2), instances=1, spinning="yes")
    with pytest.raises(ConfigError, match="ort_spinning"):
        ServerConfig(ort_spinning="sometimes")


def _pinned_server_log(repo: Path) -> str:
    """Start the server pinned to one CPU; return its log up to "serving models"."""
    taskset = shutil.which("taskset")
    if taskset is None:
        pytest.skip("taskset (util-linux) is not installed")
    one_cpu = str(min(os.sched_getaffinity(0)))
    command = [
        taskset, "-c", one_cpu,
        sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())",
        "--model-repository", str(repo), "--host", "127.0.0.1", "--grpc-port", "0",
        "--http-port", "-1", "--metrics-port", "-1", "--poll-interval-s", "0",
        "--drain-delay-s", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "serving models" in line:
                break
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return "".join(lines)


@pytest.mark.slow
def test_server_pinned_to_one_cpu_plans_one_intra_op_thread(tmp_path: Path) -> None:
    log = _pinned_server_log(make_model_repository(tmp_path / "models"))
    assert re.search(r"cpu budget 1 \(from cpu affinity; affinity 1 of", log), log[-3000:]
    assert "onnxruntime 1 intra-op and 1 inter-op thread(s) per session" in log


# Counts the OS threads a session adds: onnxruntime starts intra_op_threads - 1 pool threads
# when the session is created, so the count is exact in a process doing nothing else.
_THREADS_PER_SESSION = """
import os, sys
from pathlib import Path
from server.onnx_sessions import OnnxSessions, SessionSettings

def threads():
    return len(os.listdir("/proc/self/task"))

added = []
for intra in (1, 3):
    before = threads()
    sessions = OnnxSessions(Path(sys.argv[1]), SessionSettings(
        providers="cpu", intra_op_threads=intra, inter_op_threads=1, allow_spinning=False))
    added.append(threads() - before)
print(*added)
"""


def test_sessions_run_the_planned_intra_op_threads(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    model = repo / "classifier" / "1" / "model.onnx"
    result = subprocess.run(
        [sys.executable, "-c", _THREADS_PER_SESSION, str(model)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert result.stdout.split() == ["0", "2"], result.stderr[-2000:]


def test_every_batch_size_is_warm_before_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_model_repository(tmp_path / "models", max_batch_size=6)
    caplog.set_level(logging.INFO, logger="server.version_loader")
    with RunningServer(server_config(repo)) as server:
        assert server.sample("server_cpu_budget") >= 1
    assert "warmed up at batch sizes 1-6" in caplog.text


def test_warm_up_timeout_zero_turns_it_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_model_repository(tmp_path / "models", max_batch_size=6)
    caplog.set_level(logging.INFO, logger="server.version_loader")
    with RunningServer(server_config(repo, warmup_timeout_s=0)):
        pass
    assert "warmed up at batch sizes none" in caplog.text
    assert "batch sizes 1-6 stay cold" in caplog.text
