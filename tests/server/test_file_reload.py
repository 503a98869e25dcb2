"""ReloadingFiles reads files again when they change (in place, or by Kubernetes' symlink swap),
at most once per interval, and keeps the last good value, logged once, when a read fails."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from server.transport.file_reload import ReloadingFiles


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _read_number(path: Path) -> int:
    return int(path.read_text())  # ValueError for what is not a number


def _secret_dir(directory: Path, version: str, text: str) -> Path:
    """A Kubernetes Secret volume: ``value`` -> ``..data/value`` -> ``..VERSION/value``; a
    second call swaps ``..data`` atomically, as the kubelet does."""
    (directory / f"..{version}").mkdir()
    (directory / f"..{version}" / "value").write_text(text)
    link = directory / "..data_tmp"
    link.symlink_to(f"..{version}")
    os.replace(link, directory / "..data")
    if not (directory / "value").is_symlink():
        (directory / "value").symlink_to("..data/value")
    return directory / "value"


def test_in_place_edit_is_read_at_the_next_check(tmp_path: Path) -> None:
    path = tmp_path / "n"
    path.write_text("1")
    clock = Clock()
    files = ReloadingFiles("number", [path], lambda: _read_number(path), clock=clock)
    assert files.value == 1
    path.write_text("22")
    assert not files.refresh(), "looked again before min_interval_s"
    clock.now += 1.0
    assert files.refresh()
    assert (files.value, files.reloads) == (22, 1)
    clock.now += 1.0
    assert not files.refresh(), "unchanged files are not read again"


def test_symlink_swap_is_seen(tmp_path: Path) -> None:
    path = _secret_dir(tmp_path, "v1", "1")
    clock = Clock()
    files = ReloadingFiles("number", [path], lambda: _read_number(path), clock=clock)
    _secret_dir(tmp_path, "v2", "2")
    clock.now += 1.0
    assert files.refresh()
    assert files.value == 2


def test_a_failed_read_keeps_the_last_value_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="server.transport.file_reload")
    path = tmp_path / "n"
    path.write_text("1")
    clock = Clock()
    files = ReloadingFiles("number", [path], lambda: _read_number(path), clock=clock)
    path.write_text("not a number")
    for _ in range(3):
        clock.now += 1.0
        assert not files.refresh()
    path.unlink()
    for _ in range(3):
        clock.now += 1.0
        assert not files.refresh()
    assert files.value == 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # one per bad state, not one per check
    assert "keeping the previous one" in messages[0]
    path.write_text("3")
    clock.now += 1.0
    assert files.refresh()
    assert files.value == 3


def test_the_first_read_raises(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    with pytest.raises(OSError):
        ReloadingFiles("number", [path], lambda: _read_number(path))
