"""Trouble with one model during a poll stays with that model (a real server).

A symbolic link loop in one model's directory used to raise out of the poll: at start it took
the server down, later it aborted every poll, so the models after it never changed again.
"""

from __future__ import annotations

from pathlib import Path

import tritonclient.grpc as triton
from repository_factory import make_model_repository, write_version
from server_harness import RunningServer, server_config

BROKEN, FINE = "a_broken", "b_fine"  # sorted: the broken model is polled first


def _repository(tmp_path: Path) -> Path:
    repo = make_model_repository(tmp_path / "models", name=BROKEN)
    return make_model_repository(repo, name=FINE)


def _loop_labels(repo: Path) -> Path:
    labels = repo / BROKEN / "labels.txt"
    labels.unlink()
    labels.symlink_to(labels.name)  # labels.txt -> labels.txt
    return labels


def _served(server: RunningServer, name: str) -> list[str]:
    return [model.version_str for model in server.handle.manager.versions(name)]


def _index(server: RunningServer) -> list[tuple[str, str, str, str]]:
    response = triton.InferenceServerClient(server.target).get_model_repository_index()
    return [(m.name, m.version, m.state, m.reason) for m in response.models]


def test_a_symlink_loop_at_start_leaves_the_other_models_serving(tmp_path: Path) -> None:
    repo = _repository(tmp_path)
    labels = _loop_labels(repo)
    with RunningServer(server_config(repo, state_dir=tmp_path / "state")) as server:
        assert _served(server, FINE) == ["1"]
        assert _served(server, BROKEN) == []
        index = _index(server)
    assert index[1] == (FINE, "1", "READY", "")
    name, version, state, reason = index[0]
    assert (name, version, state) == (BROKEN, "", "UNAVAILABLE")
    assert reason.startswith(f"{labels}: cannot be resolved: ")


def test_an_error_in_one_model_during_a_poll_stays_with_that_model(tmp_path: Path) -> None:
    repo = _repository(tmp_path)
    with RunningServer(server_config(repo, state_dir=tmp_path / "state")) as server:
        labels = _loop_labels(repo)
        write_version(repo / FINE, 2)
        server.call(server.handle.manager.refresh())
        assert _served(server, FINE) == ["2"]  # polled after the broken one, as before
        assert _served(server, BROKEN) == ["1"]  # serves what it loaded before
        index = _index(server)
    assert [row[:3] for row in index] == [(BROKEN, "1", "READY"), (FINE, "2", "READY")]
    assert index[0][3].startswith(
        f"a change was refused, serving as loaded before: {labels}: cannot be resolved: "
    )
