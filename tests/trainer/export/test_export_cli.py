"""The export command line and the errors that name bad input."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_fixtures import make_checkpoint

from trainer.errors import CheckpointError, ConfigError, UsageError
from trainer.export import export_checkpoint
from trainer.export.cli import add_parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.slow
def test_cli_fp16_export_publishes_next_version(resnet_export, image_folder, tmp_path, capsys):
    result, checkpoint = resnet_export
    repository = tmp_path / "repo"
    shutil.copytree(result.model_dir.parent.parent, repository)
    args = _parser().parse_args(
        [
            "export",
            "--checkpoint",
            str(checkpoint),
            "--output-repository",
            str(repository),
            "--precision",
            "fp16",
            "--data",
            str(image_folder),
        ]
    )
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == 2 and summary["precision"] == "fp16"
    document = json.loads((repository / "classifier" / "2" / "model.json").read_text())
    assert document["precision"] == "fp16"
    parity = document["parity"]
    assert parity["reference"] == "onnx-fp32"
    assert parity["max_abs_diff_logits"] <= parity["tolerance"]
    assert document["precision_comparison"]["val_images"] == 12
    assert "val_accuracy_delta_points" in document["precision_comparison"]
    model = onnx.load(str(repository / "classifier" / "2" / "model.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    (image,) = model.graph.input
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)


@pytest.mark.parametrize(
    "flags",
    [
        ["--precision", "int4"],
        ["--input-format", "bgr"],
        ["--int8-mode", "weird"],
        ["--int8-accuracy-budget", "lots"],
    ],
)
def test_cli_rejects_unknown_option_values(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["export", "--checkpoint", "c.pt", "--output-repository", "r", *flags])
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "c.pt", "mobilenet_v3_small")


def _rewrite(source: Path, target: Path, **changes) -> Path:
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint.update(changes)
    torch.save(checkpoint, target)
    return target


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path / "nope.pt", tmp_path / "repo")


def test_truncated_checkpoint(small_checkpoint, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(small_checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        export_checkpoint(broken, tmp_path / "repo")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "something-else"}, "format is 'something-else'"),
        ({"format_version": 9}, "format_version 9"),
        ({"classes": ["a", "b"]}, "'classes' must list"),
        ({"preprocessing": {"input_size": [32, 32]}}, "preprocessing is missing"),
        ({"arch": "resnet18"}, "model_state does not fit resnet18"),
    ],
)
def test_malformed_checkpoint(small_checkpoint, tmp_path, changes, message):
    bad = _rewrite(small_checkpoint, tmp_path / "bad.pt", **changes)
    with pytest.raises(CheckpointError, match=message):
        export_checkpoint(bad, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"input_format": "bgr"}, "input format 'bgr'"),
        ({"precision": "int4"}, "precision 'int4'"),
        ({"precision": "int8"}, "int8 precision needs --data"),
        ({"int8_mode": "weird"}, "int8 mode 'weird'"),
        ({"int8_accuracy_budget": -1.0}, "budget must be >= 0"),
        ({"model_name": "../escape"}, "model name"),
        ({"data_dir": Path("/does/not/exist")}, "does not exist"),
    ],
)
def test_bad_options_are_usage_errors(small_checkpoint, tmp_path, options, message):
    with pytest.raises(UsageError, match=message) as error:
        export_checkpoint(small_checkpoint, tmp_path / "repo", **options)
    assert isinstance(error.value, ConfigError) or "does not exist" in message


@pytest.mark.slow
def test_verification_rejects_a_wrong_graph(mobilenet_export, tmp_path):
    from trainer.export.errors import ExportError
    from trainer.export.ort_checks import GraphInput
    from trainer.export.verify import check_signature, torch_parity

    result, checkpoint = mobilenet_export
    model = onnx.load(str(result.model_path))
    # A wrong classifier weight in the graph: parity against PyTorch must catch it.
    (last,) = [node for node in model.graph.node if "logits" in node.output]
    (weight,) = [t for t in model.graph.initializer if t.name == last.input[1]]
    values = onnx.numpy_helper.to_array(weight) + 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    from trainer.checkpoint import load_checkpoint
    from trainer.model.classifier import restore_classifier

    classifier, _ = restore_classifier(load_checkpoint(checkpoint))
    with pytest.raises(ExportError, match="parity check failed"):
        torch_parity(
            tampered,
            classifier,
            graph_input=GraphInput("float32-nchw", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            input_size=[32, 32],
            val_images=np.zeros((2, 32, 32, 3), np.uint8),
        )
    # A fixed batch dimension is refused before anything runs.
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(ExportError, match="fixed batch dimension"):
        check_signature(model, input_format="float32-nchw", input_size=[32, 32], num_classes=3)


def test_trainer_command_line_exits_2_on_a_missing_checkpoint(tmp_path):
    pytest.importorskip("trainer.cli", reason="the trainer command line is not there yet")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "export",
            "--checkpoint",
            str(tmp_path / "missing.pt"),
            "--output-repository",
            str(tmp_path / "repo"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr
    assert "missing.pt" in completed.stderr + completed.stdout
    assert not (tmp_path / "repo").exists()
