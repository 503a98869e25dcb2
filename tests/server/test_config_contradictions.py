"""A config.pbtxt that contradicts its graph is refused at load; the previous version serves on.

Each case goes through the real loader of a real server: the repository starts healthy, the
contradiction is written, the server polls, and the refusal names the field with both values
while ModelConfig, ModelMetadata and inference still answer from the version loaded before.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from repository_factory import build_classifier_onnx, make_model_repository
from server_harness import RunningServer, server_config

from protocol.inference import model_config_pb2 as mc


def _edit_config(repo: Path, old: str, new: str) -> None:
    path = repo / "classifier" / "config.pbtxt"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _assert_previous_still_serves(server: RunningServer) -> None:
    client = triton.InferenceServerClient(server.target)
    config = client.get_model_config("classifier").config
    assert config.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("image", mc.TYPE_UINT8, [32, 32, 3])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", mc.TYPE_FP32, [4]),
        ("probabilities", mc.TYPE_FP32, [4]),
    ]
    metadata = client.get_model_metadata("classifier")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "UINT8", [-1, 32, 32, 3])
    ]
    tensor = triton.InferInput("image", [2, 32, 32, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((2, 32, 32, 3), np.uint8))
    result = client.infer("classifier", [tensor])
    assert result.as_numpy("probabilities").shape == (2, 4)
    assert result.get_response().model_version == "1"


def _refuse(
    server: RunningServer, caplog: pytest.LogCaptureFixture, expected: str
) -> list[logging.LogRecord]:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="server.model_manager"):
        server.call(server.handle.manager.refresh())
    refusals = [r for r in caplog.records if expected in r.getMessage()]
    assert len(refusals) == 1, caplog.text
    return refusals


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "data_type: TYPE_UINT8",
            "data_type: TYPE_FP32",
            "input 'image' data_type TYPE_FP32 in config.pbtxt, TYPE_UINT8 in the graph",
        ),
        (
            "dims: [ 32, 32, 3 ]",
            "dims: [ 3, 32, 32 ]",
            "input 'image' dims [3, 32, 32] in config.pbtxt, [32, 32, 3] in the graph after "
            "the batch dimension",
        ),
        (
            'name: "image"',
            'name: "pixels"',
            "input 'pixels' in config.pbtxt, not in the graph (its inputs: image)",
        ),
        (
            'name: "logits"',
            'name: "scores"',
            "output 'scores' in config.pbtxt, not in the graph (its outputs: logits, "
            "probabilities)",
        ),
        (
            'name: "logits"\n    data_type: TYPE_FP32',
            'name: "logits"\n    data_type: TYPE_INT64',
            "output 'logits' data_type TYPE_INT64 in config.pbtxt, TYPE_FP32 in the graph",
        ),
        (
            "dims: [ 4 ]",
            "dims: [ 7 ]",
            "output 'logits' dims [7] in config.pbtxt, [4] in the graph after the batch dimension",
        ),
        (
            "max_batch_size: 16",
            "max_batch_size: 0",
            "input 'image' dims [32, 32, 3] in config.pbtxt, [-1, 32, 32, 3] in the graph;",
        ),
    ],
)
def test_a_changed_config_that_contradicts_the_graph_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, old: str, new: str, expected: str
) -> None:
    repo = make_model_repository(tmp_path / "models")
    with RunningServer(server_config(repo)) as server:
        _edit_config(repo, old, new)
        (refusal,) = _refuse(server, caplog, expected)
        message = refusal.getMessage()
        assert "model classifier version 1 rejected, previous versions keep serving" in message
        config_path = repo / "classifier" / "config.pbtxt"
        assert f"{config_path} contradicts {repo / 'classifier' / '1' / 'model.onnx'}" in message
        assert server.sample("model_load_failures_total", {"model": "classifier"}) == 1
        _assert_previous_still_serves(server)


def _write_fixed_batch_version(model_dir: Path, version: int, batch: int) -> None:
    """A version whose graph takes batches of exactly ``batch`` images."""
    model = build_classifier_onnx(seed=version)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    staging = model_dir / f".staging-{version}-{os.getpid()}"
    staging.mkdir()
    onnx.save(model, str(staging / "model.onnx"))
    staging.rename(model_dir / str(version))


def test_a_new_version_whose_graph_takes_smaller_batches_than_max_batch_size_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_model_repository(tmp_path / "models")
    with RunningServer(server_config(repo)) as server:
        _write_fixed_batch_version(repo / "classifier", 2, batch=1)
        (refusal,) = _refuse(
            server,
            caplog,
            "max_batch_size 16 in config.pbtxt, 1 in the graph (input 'image' has a fixed "
            "batch dimension)",
        )
        assert "model classifier version 2 rejected" in refusal.getMessage()
        _assert_previous_still_serves(server)


def test_an_empty_config_is_refused_and_the_loaded_version_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_model_repository(tmp_path / "models")
    with RunningServer(server_config(repo)) as server:
        (repo / "classifier" / "config.pbtxt").write_text("# nothing yet\n\n")
        (refusal,) = _refuse(
            server,
            caplog,
            f"{repo / 'classifier' / 'config.pbtxt'}: empty; state at least max_batch_size, "
            "input and output",
        )
        assert "model classifier: cannot read its configuration" in refusal.getMessage()
        _assert_previous_still_serves(server)


def test_a_contradiction_at_start_leaves_nothing_to_serve(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    _edit_config(repo, "data_type: TYPE_UINT8", "data_type: TYPE_FP32")
    server = RunningServer(server_config(repo), start_models=False)
    try:
        with pytest.raises(Exception, match="no model version could be loaded"):
            server.call(server.handle.start())
    finally:
        server.stop()


def test_what_config_pbtxt_leaves_unstated_is_reported_from_the_graph(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    (repo / "classifier" / "config.pbtxt").write_text(
        'max_batch_size: 8\ninput [ { name: "image" dims: [ 32, 32, 3 ] } ]\ndynamic_batching { }\n'
    )
    with RunningServer(server_config(repo)) as server:
        config = triton.InferenceServerClient(server.target).get_model_config("classifier").config
    assert config.name == "classifier" and config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("image", mc.TYPE_UINT8, [32, 32, 3])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", mc.TYPE_FP32, [4]),
        ("probabilities", mc.TYPE_FP32, [4]),
    ]
