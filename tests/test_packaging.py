"""The base install (no extras) gives working commands or a one-line hint, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UV = Path(sys.prefix) / "bin" / "uv"


@pytest.fixture(scope="module")
def base_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with `pip install .` semantics: the project and its base dependencies only."""
    if not UV.is_file():
        pytest.skip(f"uv is not installed in {sys.prefix} (make venv installs it)")
    venv = tmp_path_factory.mktemp("base-install") / "venv"
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, venv], check=True, env=env)
    subprocess.run(
        [UV, "pip", "install", "--quiet", "--python", venv / "bin" / "python", ROOT],
        check=True,
        env=env,
        timeout=600,
    )
    return venv / "bin"


@pytest.mark.slow
@pytest.mark.parametrize(("command", "extra"), [("trainer", "train"), ("server", "serve")])
def test_command_without_its_extra_names_the_extra(
    base_install: Path, command: str, extra: str
) -> None:
    result = subprocess.run(
        [base_install / command, "--help"], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"finetune-serve[{extra}]" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_client_runs_on_the_base_install(base_install: Path) -> None:
    result = subprocess.run(
        [base_install / "client", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "classify" in result.stdout


def test_test_files_have_unique_names() -> None:
    # The test folders are not packages: two files of one name stop pytest at collection.
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({name for name in names if names.count(name) > 1}) == []
