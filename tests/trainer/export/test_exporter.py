"""End-to-end exports of real tiny checkpoints: parity, signature, metadata, repository files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_fixtures import CLASSES, MEAN, SIZE, STD
from google.protobuf import text_format

from trainer.export.graph import normalize_uint8_nhwc
from trainer.export.images import SplitRule, list_split, load_split
from trainer.export.metadata import read_embedded
from trainer.model.classifier import create_model

pytestmark = pytest.mark.slow

CONTRACT_KEYS = {
    "labels",
    "input_format",
    "input_size",
    "resize_size",
    "mean",
    "std",
    "precision",
    "arch",
    "weights",
    "training",
    "dataset_fingerprint",
    "parity",
    "exporter",
    "versions",
    "git_commit",
    "created_at",
}


def _reference_model(checkpoint_path: Path) -> torch.nn.Module:
    """The classifier rebuilt independently of the exporter (EMA weights when present)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    head = checkpoint["head"]
    model = create_model(
        checkpoint["arch"],
        checkpoint["num_classes"],
        head_hidden=head["hidden"],
        head_dropout=head["dropout"],
    )
    state = (
        checkpoint["ema_state"]
        if checkpoint["ema_state"] is not None
        else checkpoint["model_state"]
    )
    model.load_state_dict(state)
    return model.eval()


def _model_config():
    from protocol.inference import model_config_pb2

    return model_config_pb2


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_uint8_nhwc_parity_against_pytorch(resnet_export, image_folder, batch):
    result, checkpoint = resnet_export
    model = _reference_model(checkpoint)
    files = list_split(image_folder, "val", CLASSES, SplitRule(val_fraction=0.2, seed=0))
    val = load_split(files, input_size=[SIZE, SIZE], resize_size=36)
    images = val.images[np.arange(batch) % len(val)]
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(None, {"image": images})
    with torch.no_grad():
        expected = model(normalize_uint8_nhwc(torch.from_numpy(images), MEAN, STD)).numpy()
    assert logits.shape == probabilities.shape == (batch, len(CLASSES))
    assert np.max(np.abs(logits - expected)) <= 1e-4
    np.testing.assert_allclose(
        probabilities, torch.softmax(torch.from_numpy(expected), 1), atol=1e-5
    )


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_float32_nchw_parity_against_pytorch(mobilenet_export, batch):
    result, checkpoint = mobilenet_export
    model = _reference_model(checkpoint)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    logits, _ = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert logits.shape == (batch, len(CLASSES))
    assert np.max(np.abs(logits - expected)) <= 1e-4


def test_measured_parity_is_stored(resnet_export, mobilenet_export):
    for result, sources in ((resnet_export[0], 6), (mobilenet_export[0], 3)):
        parity = result.metadata["parity"]
        assert parity["batch_sizes"] == [1, 3, 17]
        # 1e-4 of the largest logit (at least 1e-4): float32 digits, whatever the scale.
        assert 1e-4 <= parity["tolerance"] <= 1e-2
        assert parity["max_abs_diff_logits"] == result.max_abs_diff <= parity["tolerance"]
        # Random images always; real val images only when data was given (resnet).
        assert len(parity["per_source"]) == sources


def test_graph_signature_and_opset(resnet_export, mobilenet_export):
    for result, elem, dims in (
        (resnet_export[0], onnx.TensorProto.UINT8, [SIZE, SIZE, 3]),
        (mobilenet_export[0], onnx.TensorProto.FLOAT, [3, SIZE, SIZE]),
    ):
        model = onnx.load(str(result.model_path))
        onnx.checker.check_model(model, full_check=True)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
        (image,) = model.graph.input
        assert image.name == "image" and image.type.tensor_type.elem_type == elem
        shape = image.type.tensor_type.shape.dim
        assert not shape[0].HasField("dim_value")
        assert [d.dim_value for d in shape[1:]] == dims
        assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
        assert not list(result.model_dir.glob("*.data"))  # one self-contained file


def test_metadata_in_model_json_and_onnx(resnet_export):
    result, _ = resnet_export
    document = json.loads((result.model_dir / "model.json").read_text())
    assert document.keys() >= CONTRACT_KEYS
    assert read_embedded(onnx.load(str(result.model_path))) == document
    assert document["labels"] == CLASSES
    assert document["input_format"] == "uint8-nhwc"
    assert document["input_size"] == [SIZE, SIZE] and document["resize_size"] == 36
    assert document["mean"] == MEAN and document["std"] == STD
    assert document["precision"] == "fp32" and document["arch"] == "resnet18"
    assert document["training"] == {"best_val_accuracy": 0.5, "epochs": {"head": 1, "finetune": 1}}
    assert document["dataset_fingerprint"]["file_count"] == 12
    assert document["exporter"] == "torch.onnx.export(dynamo=True)"
    assert document["state_source"] == "ema_state"
    assert {"torch", "onnx", "python"} <= document["versions"].keys()
    assert document["optimization"]["nodes_after"] <= document["optimization"]["nodes_before"]


def test_repository_layout_config_and_labels(resnet_export, mobilenet_export):
    pb = _model_config()
    # The resnet export had val data (--data), so it carries a golden set; the other did not.
    for result, name, data_type, layout, dims, files in (
        (
            resnet_export[0], "classifier", pb.TYPE_UINT8, pb.ModelInput.FORMAT_NHWC,
            [SIZE, SIZE, 3], ["golden", "model.json", "model.onnx"],
        ),
        (
            mobilenet_export[0], "mnv3", pb.TYPE_FP32, pb.ModelInput.FORMAT_NCHW,
            [3, SIZE, SIZE], ["model.json", "model.onnx"],
        ),
    ):  # fmt: skip
        assert result.version == 1 and result.model_dir.name == "1"
        model_root = result.model_dir.parent
        assert model_root.name == name
        assert sorted(p.name for p in model_root.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
        assert sorted(p.name for p in result.model_dir.iterdir()) == files
        config = text_format.Parse((model_root / "config.pbtxt").read_text(), pb.ModelConfig())
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size >= 1
        assert config.HasField("dynamic_batching")
        (image,) = config.input
        assert (image.name, image.data_type, image.format) == ("image", data_type, layout)
        assert list(image.dims) == dims
        logits, probabilities = config.output
        assert (logits.name, probabilities.name) == ("logits", "probabilities")
        assert logits.data_type == probabilities.data_type == pb.TYPE_FP32
        assert list(logits.dims) == list(probabilities.dims) == [len(CLASSES)]
        assert probabilities.label_filename == "labels.txt"
        assert (model_root / "labels.txt").read_text().splitlines() == CLASSES


def test_abstention_threshold_and_val_counts_for_the_server(resnet_export, mobilenet_export):
    result, _ = resnet_export
    document = json.loads((result.model_dir / "model.json").read_text())
    abstention = document["abstention"]
    assert abstention["target_precision"] == 0.95
    assert 0.0 <= abstention["threshold"] <= 1.0
    assert 0.0 <= abstention["coverage"] <= 1.0
    assert abstention["coverage"] == 0.0 or abstention["precision"] >= 0.95
    assert sum(document["val_class_counts"]) == abstention["count"]
    assert len(document["val_class_counts"]) == len(CLASSES)
    # Without --data there are no val images to choose a threshold on.
    bare, _ = mobilenet_export
    bare_document = json.loads((bare.model_dir / "model.json").read_text())
    assert "abstention" not in bare_document and "val_class_counts" not in bare_document
