"""The rollout gate fails closed and its verdicts survive restarts (real servers, real loads).

A version the gate refused stays refused after a restart (its verdict is on file beside it, or
in the state directory when the repository is read-only); the gate judges against the newest
older version on disk, loaded or not; a version without a golden set is refused unless
allowed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton
from repository_factory import make_model_repository, write_version
from server_harness import RunningServer, server_config

from contracts.golden_set import GOLDEN_DIRNAME, GOLDEN_FILENAME
from server.config import load_config

REFUSALS = "model_rollout_refusals_total"
MODEL = {"model": "classifier"}
LENIENT = {"rollout_max_accuracy_drop": 1.0}  # the gate lets anything through


def _golden_path(version_dir: Path) -> Path:
    return version_dir / GOLDEN_DIRNAME / GOLDEN_FILENAME


def _label_golden_set_with_its_own_answers(version_dir: Path) -> list[int]:
    """True classes = the version's own top-1: its accuracy on its golden set is 1.0."""
    path = _golden_path(version_dir)
    document = json.loads(path.read_text())
    for image in document["images"]:
        image["true_label"] = image["top1"]
    path.write_text(json.dumps(document))
    return [image["top1"] for image in document["images"]]


def _unlabel_golden_set(version_dir: Path) -> None:
    """No true classes: a version judged against this set now has nothing to compare with."""
    path = _golden_path(version_dir)
    document = json.loads(path.read_text())
    for image in document["images"]:
        image.pop("true_label", None)
    path.write_text(json.dumps(document))


def _worse_version(model_dir: Path, version: int, truth: list[int]) -> None:
    """Another random model: it disagrees with the labelled truth on some images."""
    write_version(model_dir, version)
    document = json.loads(_golden_path(model_dir / str(version)).read_text())
    assert [image["top1"] for image in document["images"]] != truth


def _served(server: RunningServer) -> list[str]:
    return [model.version_str for model in server.handle.manager.versions("classifier")]


def _index(server: RunningServer) -> dict[str, tuple[str, str]]:
    """version -> (state, reason), through tritonclient's RepositoryIndex."""
    response = triton.InferenceServerClient(server.target).get_model_repository_index()
    return {m.version: (m.state, m.reason) for m in response.models if m.name == "classifier"}


def _verdict(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_gate_judges_against_the_newest_older_version_on_disk_at_start(
    tmp_path: Path,
) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    model_dir = repo / "classifier"
    truth = _label_golden_set_with_its_own_answers(model_dir / "1")
    _worse_version(model_dir, 2, truth)
    # Nothing is loaded before version 2 is judged: version 1 is only on disk.
    with RunningServer(server_config(repo, state_dir=tmp_path / "state")) as server:
        assert _served(server) == ["1"]
        assert server.sample(REFUSALS, MODEL) == 1
        state, reason = _index(server)["2"]
    assert state == "UNAVAILABLE"
    assert reason.startswith("rollout gate refused on ")
    assert "against version 1: rollout check failed" in reason
    verdict = _verdict(model_dir / "2.verdict.json")
    assert verdict["accepted"] is False and verdict["baseline_version"] == 1
    assert verdict["baseline_accuracy"] == 1.0 and verdict["accuracy"] < 0.95
    assert verdict["images"] == len(truth) and verdict["max_drop"] == 0.05
    accepted = _verdict(model_dir / "1.verdict.json")  # the fall back was judged too
    assert accepted["accepted"] is True and accepted["baseline_version"] is None


def test_a_refused_version_stays_refused_after_a_restart(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    model_dir = repo / "classifier"
    truth = _label_golden_set_with_its_own_answers(model_dir / "1")
    config = server_config(repo, state_dir=tmp_path / "state")
    with RunningServer(config) as server:
        _worse_version(model_dir, 2, truth)
        server.call(server.handle.manager.refresh())
        assert _served(server) == ["1"] and server.sample(REFUSALS, MODEL) == 1
    # Judged afresh, version 2 would now pass: version 1's golden set has no true classes.
    _unlabel_golden_set(model_dir / "1")
    with RunningServer(config) as server:
        assert _served(server) == ["1"]
        assert server.sample(REFUSALS, MODEL) == 0  # the verdict on file, not a new judgement
        state, reason = _index(server)["2"]
        assert state == "UNAVAILABLE"
        assert "against version 1: rollout check failed" in reason
        assert reason.endswith(
            f"(verdict in {model_dir / '2.verdict.json'}; delete it to judge again)"
        )
        server.call(server.handle.manager.refresh())
        assert _served(server) == ["1"]  # not retried while nothing changed
        # The operator's way out: delete the verdict; the next poll judges the version again.
        (model_dir / "2.verdict.json").unlink()
        server.call(server.handle.manager.refresh())
        assert _served(server) == ["2"]
    verdict = _verdict(model_dir / "2.verdict.json")
    assert verdict["accepted"] is True
    assert verdict["reason"] == "version 1's golden set has no labelled images"


def test_a_version_without_a_golden_set_is_refused_unless_allowed(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    write_version(repo / "classifier", 2, golden=False)
    state = tmp_path / "state"
    with RunningServer(server_config(repo, state_dir=state)) as server:
        assert _served(server) == ["1"]
        status, reason = _index(server)["2"]
    assert status == "UNAVAILABLE"
    assert "version 2 has no golden set" in reason
    assert "allow_versions_without_golden_set" in reason
    allowed = server_config(repo, state_dir=state, allow_versions_without_golden_set=True)
    with RunningServer(allowed) as server:
        assert _served(server) == ["2"]


def test_an_unreadable_golden_set_of_the_baseline_refuses_the_version(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    model_dir = repo / "classifier"
    _label_golden_set_with_its_own_answers(model_dir / "1")
    config = server_config(repo, state_dir=tmp_path / "state")
    with RunningServer(config) as server:
        _golden_path(model_dir / "1").write_text("{ not json")
        write_version(model_dir, 2)  # its own golden set is fine; version 1's is not
        server.call(server.handle.manager.refresh())
        assert _served(server) == ["1"]
        state, reason = _index(server)["2"]
    assert state == "UNAVAILABLE"
    assert reason.startswith("cannot be checked on version 1's golden set: ")
    assert str(_golden_path(model_dir / "1")) in reason
    assert not (model_dir / "2.verdict.json").exists()  # no verdict: the set may be repaired


@contextlib.contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """No file can be created in ``directory``, by root too (the immutable attribute)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make a directory read-only for root here: {made.stderr!r}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_read_only_repository_keeps_the_verdict_in_the_state_dir(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    model_dir = repo / "classifier"
    truth = _label_golden_set_with_its_own_answers(model_dir / "1")
    _worse_version(model_dir, 2, truth)
    state = tmp_path / "state"
    config = server_config(repo, state_dir=state)
    with _read_only(model_dir):
        with RunningServer(config) as server:
            assert _served(server) == ["1"] and server.sample(REFUSALS, MODEL) == 1
        assert not (model_dir / "2.verdict.json").exists()
        verdict = _verdict(state / "classifier" / "2.verdict.json")
        assert verdict["accepted"] is False and verdict["baseline_version"] == 1
        _unlabel_golden_set(model_dir / "1")  # judged afresh, version 2 would pass now
        with RunningServer(config) as server:
            assert _served(server) == ["1"]
            assert server.sample(REFUSALS, MODEL) == 0
            assert str(state / "classifier" / "2.verdict.json") in _index(server)["2"][1]


def test_the_new_settings_come_from_flags_environment_and_file(tmp_path: Path) -> None:
    flags = load_config(
        ["--allow-versions-without-golden-set", "true", "--state-dir", str(tmp_path)], environ={}
    )
    assert flags.allow_versions_without_golden_set is True and flags.state_dir == tmp_path
    environ = {"SERVER_ALLOW_VERSIONS_WITHOUT_GOLDEN_SET": "yes", "SERVER_STATE_DIR": "/s"}
    from_env = load_config([], environ=environ)
    assert from_env.allow_versions_without_golden_set is True
    assert from_env.state_dir == Path("/s")
    path = tmp_path / "server.yaml"
    path.write_text("allow_versions_without_golden_set: true\nstate_dir: /var/lib/server\n")
    from_file = load_config(["--config", str(path)], environ={})
    assert from_file.allow_versions_without_golden_set is True
    assert from_file.state_dir == Path("/var/lib/server")
    assert load_config([], environ={}).allow_versions_without_golden_set is False


def test_a_larger_allowed_drop_judges_a_refused_version_again(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    model_dir = repo / "classifier"
    truth = _label_golden_set_with_its_own_answers(model_dir / "1")
    _worse_version(model_dir, 2, truth)
    config = server_config(repo, state_dir=tmp_path / "state")
    with RunningServer(config) as server:
        assert _served(server) == ["1"]
    with RunningServer(server_config(repo, state_dir=tmp_path / "state", **LENIENT)) as server:
        assert _served(server) == ["2"]
        assert server.sample(REFUSALS, MODEL) == 0
    verdict = _verdict(model_dir / "2.verdict.json")
    assert verdict["accepted"] is True and verdict["max_drop"] == 1.0
    with RunningServer(config) as server:  # accepted stays accepted
        assert _served(server) == ["2"]
