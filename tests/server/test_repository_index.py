"""Triton's RepositoryIndex through tritonclient.grpc against a real server."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import tritonclient.grpc as triton
from repository_factory import make_model_repository, write_version
from server_harness import RunningServer, server_config

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc


def _index(target: str) -> list[tuple[str, str, str, str]]:
    response = triton.InferenceServerClient(target).get_model_repository_index()
    return [(m.name, m.version, m.state, m.reason) for m in response.models]


def test_index_lists_ready_and_refused_versions_and_unreadable_models(tmp_path: Path) -> None:
    repo = make_model_repository(
        tmp_path / "models", versions=(1,), config_extra="version_policy { all {} }\n"
    )
    write_version(repo / "classifier", 2, corrupt=True)
    make_model_repository(repo, name="other")
    with RunningServer(server_config(repo)) as server:
        (repo / "other" / "config.pbtxt").write_text("max_batch_size: [\n")
        server.call(server.handle.manager.refresh())
        index = _index(server.target)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)

    assert [row[:3] for row in index] == [
        ("classifier", "1", "READY"),
        ("classifier", "2", "UNAVAILABLE"),
        ("other", "1", "READY"),
    ]
    assert index[0][3] == ""
    broken = repo / "classifier" / "2" / "model.onnx"
    assert f"{broken}: onnxruntime could not load it" in index[1][3]
    # "other" serves what it loaded before its config.pbtxt broke, and says so.
    assert index[2][3].startswith("a change was refused, serving as loaded before: ")
    assert f"{repo / 'other' / 'config.pbtxt'}:" in index[2][3]
    assert [(m.name, m.version, m.state) for m in ready.models] == [
        ("classifier", "1", "READY"),
        ("other", "1", "READY"),
    ]


def test_a_model_that_never_loaded_is_unavailable_with_its_reason(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    make_model_repository(repo, name="empty")
    (repo / "empty" / "config.pbtxt").write_text("\n")
    with RunningServer(server_config(repo)) as server:
        index = _index(server.target)
    assert index[0] == ("classifier", "1", "READY", "")
    name, version, state, reason = index[1]
    assert (name, version, state) == ("empty", "", "UNAVAILABLE")
    assert reason.startswith(f"{repo / 'empty' / 'config.pbtxt'}: empty;")


def test_a_version_warming_up_is_loading(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", slow_layers=2, max_batch_size=8)
    with RunningServer(server_config(repo), start_models=False) as server:
        started = server.submit(server.handle.start())
        seen = set()
        deadline = time.monotonic() + 60
        while not started.done() and time.monotonic() < deadline:
            seen.update(state for _, _, state, _ in _index(server.target))
            time.sleep(0.01)
        started.result(timeout=60)
        seen.update(state for _, _, state, _ in _index(server.target))
    assert {"LOADING", "READY"} <= seen
