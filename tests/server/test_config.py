"""Settings precedence (defaults < file < environment < flags) and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.config import load_config
from server.errors import ConfigError


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "server.yaml"
    config_file.write_text("grpc_port: 9000\nmax-batch-size: 4\ninstances: 3\nproviders: cpu\n")
    env = {"SERVER_MAX_BATCH_SIZE": "6", "SERVER_INSTANCES": "2", "SERVER_CONFIG": str(config_file)}
    config = load_config(["--instances", "5"], env)
    assert config.grpc_port == 9000  # file
    assert config.max_batch_size == 6  # environment over file
    assert config.instances == 5  # flag over environment
    assert config.providers == "cpu"
    assert config.metrics_port == 8002  # default


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--grpc-port", "eighty"], {}, "grpc_port"),
        ([], {"SERVER_GRPC_PORTT": "1"}, "SERVER_GRPC_PORTT"),
        (["--tls-cert", "a.pem"], {}, "tls_cert and tls_key"),
        (["--instances", "0"], {}, "instances"),
        ([], {"SERVER_MAX_QUEUE_DELAY_US": "-1"}, "max_queue_delay_us"),
        (["--health-port", "-2"], {}, "health_port"),
        (["--health-port", "65536"], {}, "health_port"),
        (["--metrics-timeout-s", "0"], {}, "metrics_timeout_s"),
    ],
)
def test_bad_settings_name_the_setting(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(argv, env)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    config_file = tmp_path / "server.yaml"
    config_file.write_text("grpc_prot: 1\n")
    with pytest.raises(ConfigError, match="grpc_prot"):
        load_config(["--config", str(config_file)], {})


def test_cli_help_and_usage_errors() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--model-repository", "--max-queue-delay-us", "--grace-period-s", "SERVER_"):
        assert flag in help_text
    bad = subprocess.run(
        [sys.executable, "-m", "server.cli", "--providers", "cuda", "--instances", "-3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "instances" in bad.stderr
