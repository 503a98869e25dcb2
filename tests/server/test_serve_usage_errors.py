"""Usage mistakes: one line ``server: error: ...`` naming the problem, exit 2, no traceback.

The port tests hold a port of their own (bound to 127.0.0.1:0, read back) and hand it to a real
``server`` process, once per listener the server opens.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from server_harness import RunningServer, server_config

from server.app import build_server
from server.config import build_parser, load_config
from server.errors import ConfigError

# Fast even on a loaded 2-core CI machine; the deterministic check is the one on sys.modules.
FAST_SECONDS = 6.0
HEAVY_MODULES = ("onnxruntime", "grpc", "torch", "numpy")


def run_server(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SERVER_")}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**environ, **(env or {})},
    )


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("server: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.returncode == 2


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize(
    ("setting", "ports"),
    [
        ("grpc_port", {"--grpc-port": "TAKEN", "--http-port": "0", "--metrics-port": "0"}),
        ("http_port", {"--grpc-port": "0", "--http-port": "TAKEN", "--metrics-port": "0"}),
        ("metrics_port", {"--grpc-port": "0", "--http-port": "0", "--metrics-port": "TAKEN"}),
        (
            "health_port",
            {
                "--grpc-port": "0",
                "--http-port": "0",
                "--metrics-port": "0",
                "--health-port": "TAKEN",
            },
        ),
    ],
)
def test_port_in_use(
    setting: str, ports: dict[str, str], taken_port: int, model_repository: Path
) -> None:
    flags = [part for flag, value in ports.items() for part in (flag, value)]
    result = run_server(
        "--model-repository",
        model_repository,
        "--host",
        "127.0.0.1",
        *(str(taken_port) if part == "TAKEN" else part for part in flags),
    )
    assert_usage_error(result, f"{setting}: 127.0.0.1:{taken_port} is already in use")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("setting", ["grpc_port", "http_port", "metrics_port", "health_port"])
def test_a_port_taken_after_the_check_is_a_config_error(
    setting: str, taken_port: int, model_repository: Path
) -> None:
    # The race the command's check cannot close: build_server itself says which port, and
    # leaves no half-started gRPC server to complain on the closed event loop.
    config = server_config(model_repository, **{"metrics_port": 0, setting: taken_port})
    with pytest.raises(ConfigError, match=f"^{setting}: cannot listen on 127.0.0.1:{taken_port}"):
        asyncio.run(build_server(config, CollectorRegistry()))
    gc.collect()


def test_bad_port_is_reported_fast_and_before_onnxruntime_is_imported() -> None:
    # 2 cores: 0.3-0.6 s before and after; the settings never needed onnxruntime.
    started = time.perf_counter()
    result = run_server("--grpc-port", "-1")
    elapsed = time.perf_counter() - started
    assert_usage_error(result, "grpc_port must be in 0..65535, got -1")
    assert elapsed < FAST_SECONDS
    code = (
        "import json, sys; from server.cli import main; code = main(['--grpc-port', '-1']); "
        f"print(json.dumps([code, [m for m in {HEAVY_MODULES!r} if m in sys.modules]]))"
    )
    probe = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(probe.stdout.splitlines()[-1]) == [2, []]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVER_GRPC_PORT": "eighty"}, "SERVER_GRPC_PORT: cannot read 'eighty' as an integer"),
        ({"SERVER_GRPC_PORT": "-1"}, "SERVER_GRPC_PORT: grpc_port must be in 0..65535, got -1"),
        ({"SERVER_WARMUP_BATCH_SIZES": "1,x"}, "SERVER_WARMUP_BATCH_SIZES: cannot read '1,x'"),
        ({"SERVER_DRAIN_DELAY_S": "soon"}, "SERVER_DRAIN_DELAY_S: cannot read 'soon' as a number"),
    ],
)
def test_environment_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config([], env)
    assert message in str(caught.value)


def test_flag_and_file_errors_name_the_setting_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^grpc_port: cannot read 'eighty' as an integer$"):
        load_config(["--grpc-port", "eighty"], {})
    config_file = tmp_path / "server.yaml"
    config_file.write_text("grpc-port: eighty\n")
    with pytest.raises(ConfigError, match=f"config file {config_file}: grpc_port: cannot read"):
        load_config(["--config", str(config_file)], {})


def test_environment_error_is_one_line_with_exit_2(tmp_path: Path) -> None:
    result = run_server(env={"SERVER_GRPC_PORT": "eighty"})
    assert_usage_error(result, "SERVER_GRPC_PORT: cannot read 'eighty' as an integer")


def test_help_shows_no_python_reprs_as_defaults() -> None:
    text = build_parser().format_help()
    assert "[default: ()]" not in text and "[default: None]" not in text
    assert "max_batch_size). [default: empty]" in " ".join(text.split())
    assert "PEM server certificate (TLS). [default: unset]" in " ".join(text.split())


def test_start_up_log_names_only_the_listeners_that_are_on(
    model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.app")
    with RunningServer(server_config(model_repository), start_models=False) as server:
        port = server.port
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gRPC on")]
    assert line.startswith(f"gRPC on 127.0.0.1:{port} (plaintext), metrics off; settings:")
    assert "None" not in line.split("; settings:")[0]
