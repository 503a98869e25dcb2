"""Atomic publishing: a write killed or failing mid-way leaves no visible or corrupt version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest
from export_fixtures import CLASSES

from contracts.repository_layout import STAGING_PREFIX, version_numbers
from trainer.errors import ConfigError
from trainer.export.repository import publish, render_config, validate_model_name

CONFIG = render_config("classifier", input_format="uint8-nhwc", input_size=[32, 32], num_classes=3)
LIMIT = 1 << 20  # file size limit of the child process: model.onnx is larger

_CHILD = """
import resource, signal, sys
from pathlib import Path
from trainer.export.repository import publish, render_config
if sys.argv[3] == "kill":
    # The kernel kills the process with SIGXFSZ in the middle of writing model.onnx, as an
    # out-of-quota or OOM kill would; Python ignores that signal unless told otherwise.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
publish(
    Path(sys.argv[1]),
    "classifier",
    version_files={{"model.onnx": Path(sys.argv[2]).read_bytes(), "model.json": b"{{}}"}},
    config_text=render_config(
        "classifier", input_format="uint8-nhwc", input_size=[32, 32], num_classes=3
    ),
    labels={classes!r},
)
"""


def _publish_in_child(repository: Path, model: Path, mode: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(_CHILD).format(limit=LIMIT, classes=CLASSES)
    return subprocess.run(
        [sys.executable, "-c", code, str(repository), str(model), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _publish(repository: Path, model_bytes: bytes) -> tuple[int, Path]:
    return publish(
        repository,
        "classifier",
        version_files={"model.onnx": model_bytes, "model.json": b"{}"},
        config_text=CONFIG,
        labels=CLASSES,
    )


@pytest.fixture()
def model_file(mobilenet_export) -> Path:
    path = mobilenet_export[0].model_path
    assert path.stat().st_size > 2 * LIMIT
    return path


@pytest.mark.slow
def test_export_killed_mid_write_leaves_no_version(model_file, tmp_path):
    repository = tmp_path / "repo"
    model_bytes = model_file.read_bytes()
    assert _publish(repository, model_bytes)[0] == 1

    child = _publish_in_child(repository, model_file, "kill")

    assert child.returncode == -signal.SIGXFSZ, child.stderr
    model_root = repository / "classifier"
    assert version_numbers(model_root) == [1]
    (staging,) = [p for p in model_root.iterdir() if p.name.startswith(STAGING_PREFIX)]
    partial = staging / "model.onnx"
    assert partial.stat().st_size == LIMIT < len(model_bytes)  # it really died mid-write
    onnx.checker.check_model(str(model_root / "1" / "model.onnx"), full_check=True)
    assert (model_root / "labels.txt").read_text().splitlines() == CLASSES
    assert (model_root / "config.pbtxt").read_text() == CONFIG

    version, model_dir = _publish(repository, model_bytes)
    assert version == 2
    assert (model_dir / "model.onnx").read_bytes() == model_bytes
    assert version_numbers(model_root) == [1, 2]


@pytest.mark.slow
def test_failed_write_removes_staging_and_raises(model_file, tmp_path):
    repository = tmp_path / "repo"
    child = _publish_in_child(repository, model_file, "raise")
    assert child.returncode == 1
    assert "File too large" in child.stderr
    model_root = repository / "classifier"
    assert list(model_root.iterdir()) == []  # no version, no staging, no config written
    assert _publish(repository, model_file.read_bytes())[0] == 1


def test_only_integer_directories_are_versions(tmp_path):
    for name in ("1", "7", "01", "0", "abc", ".staging-x", ".3"):
        (tmp_path / name).mkdir()
    (tmp_path / "9").write_text("a file, not a version")
    assert version_numbers(tmp_path) == [1, 7]


def test_next_version_follows_the_highest(tmp_path):
    model_root = tmp_path / "classifier"
    (model_root / "5").mkdir(parents=True)
    (model_root / "5" / "model.onnx").write_bytes(b"old")
    (model_root / ".staging-left-over").mkdir()
    version, model_dir = _publish(tmp_path, b"new")
    assert (version, model_dir.name) == (6, "6")
    assert (model_root / "5" / "model.onnx").read_bytes() == b"old"


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "x y", "-dash"])
def test_bad_model_names_are_refused(name):
    with pytest.raises(ConfigError, match="model name"):
        validate_model_name(name)


def test_stale_staging_directories_are_removed(tmp_path):
    model_root = tmp_path / "classifier"
    stale, fresh = model_root / ".staging-stale", model_root / ".staging-fresh"
    for path in (stale, fresh):
        path.mkdir(parents=True)
        (path / "model.onnx").write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert _publish(tmp_path, b"new")[0] == 1
    assert not stale.exists()
    assert fresh.exists()  # may belong to an export that is running right now


def test_published_version_is_readable_by_other_users(tmp_path: Path) -> None:
    previous = os.umask(0o077)  # a strict umask must not hide the model from the server
    try:
        _, model_dir = publish(
            tmp_path,
            "classifier",
            version_files={"model.onnx": b"graph", "model.json": b"{}"},
            config_text=CONFIG,
            labels=CLASSES,
        )
    finally:
        os.umask(previous)
    assert model_dir.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "classifier").stat().st_mode & 0o777 == 0o755
    files = [*model_dir.iterdir(), tmp_path / "classifier" / "config.pbtxt"]
    files.append(tmp_path / "classifier" / "labels.txt")
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}
