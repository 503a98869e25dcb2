"""``client verify`` against a live server gives the verdict the server's own load-time check
gives for the same directory (pass: exit 0; fail: exit 1, naming the image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_harness import RunningServer

from client.cli import main
from contracts.golden_set import GOLDEN_DIRNAME, GOLDEN_FILENAME
from server.golden_set import check_golden_set
from server.onnx_sessions import OnnxSessions, SessionSettings
from server.repository import VersionSource, read_metadata


def _server_verdict(version_dir: Path) -> bool:
    sessions = OnnxSessions(
        version_dir / "model.onnx", SessionSettings(providers="cpu", intra_op_threads=1)
    )
    metadata = read_metadata(VersionSource("classifier", 1, version_dir), {})
    verdict = check_golden_set(version_dir, metadata, sessions)
    assert verdict is not None
    return verdict.passed


def _verify(server: RunningServer, repository: Path, *extra: str) -> int:
    return main(
        ["verify", "--target", server.target, "--model", "classifier",
         "--repository", str(repository), *extra]
    )  # fmt: skip


def test_verify_passes_a_served_version(
    running_server: RunningServer, model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _verify(running_server, model_repository) == 0
    assert capsys.readouterr().out.startswith("PASS model classifier version 1: 4 golden images")
    assert _server_verdict(model_repository / "classifier" / "1")


def test_verify_fails_when_the_server_does_not_reproduce_the_set(
    running_server: RunningServer, model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What the trainer "computed" is changed after the server loaded the version: the
    # server's answers stay, so the set is no longer reproduced.
    path = model_repository / "classifier" / "1" / GOLDEN_DIRNAME / GOLDEN_FILENAME
    document = json.loads(path.read_text())
    first = document["images"][0]
    first["probabilities"] = [p * 0.5 for p in first["probabilities"]]
    path.write_text(json.dumps(document))

    assert _verify(running_server, model_repository, "--model-version", "1", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["version"] == "1"
    assert report["problems"][0].startswith(f"{first['file']}: probability of")
    assert not _server_verdict(model_repository / "classifier" / "1")


def test_verify_without_a_golden_set_is_a_usage_error(
    running_server: RunningServer, model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = model_repository / "classifier" / "1" / GOLDEN_DIRNAME / GOLDEN_FILENAME
    path.unlink()
    assert _verify(running_server, model_repository) == 2
    assert "has no golden set" in capsys.readouterr().err
