"""model.json: one reader for the server, ``trainer evaluate`` and the export, old files too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from contracts.graph_signature import FLOAT32_NCHW, UINT8_NHWC
from contracts.model_metadata import (
    MAX_METADATA_BYTES,
    METADATA_FORMAT_VERSION,
    Abstention,
    InvalidModelMetadata,
    ModelMetadata,
    TemperatureCalibration,
    metadata_from_props,
    read_model_metadata,
)
from contracts.preprocessing import Preprocessing

# What the export of the release before ``format_version`` wrote for an fp32 model with val
# data, calibration and AdaBN (trainer/export/metadata.py and exporter.py of that release),
# byte for byte the keys and shapes, provenance values as one run had them.
PREVIOUS_RELEASE = """
{
  "labels": ["cat", "dog", "fox"],
  "input_format": "uint8-nhwc",
  "input_size": [224, 224],
  "resize_size": 256,
  "mean": [0.485, 0.456, 0.406],
  "std": [0.229, 0.224, 0.225],
  "precision": "fp32",
  "arch": "resnet18",
  "weights": "DEFAULT",
  "training": {"best_val_accuracy": 0.9333, "epochs": {"head": 3, "finetune": 5}},
  "dataset_fingerprint": {"classes": ["cat", "dog", "fox"], "file_count": 150,
                          "sha256": "9f2c6a0e1b"},
  "parity": {"max_abs_diff_logits": 2.1e-06, "tolerance": 0.00012, "batch_sizes": [1, 3, 17],
             "reference": "torch-eval-fp32",
             "per_source": {"random-b1": 1.9e-06, "random-b17": 2.1e-06, "val-b3": 1.2e-06}},
  "exporter": "torch.onnx.export(dynamo=True)",
  "versions": {"python": "3.12.3", "torch": "2.6.0", "torchvision": "0.21.0", "onnx": "1.17.0",
               "onnxruntime": "1.20.1"},
  "git_commit": null,
  "created_at": "2025-11-03T09:12:44+00:00",
  "adaptation": {"unlabeled_data": {"files_found": 40, "images_used": 40,
                                    "skipped_unreadable": 0},
                 "feature_alignment": null,
                 "adabn": {"kept": true, "reason": "val accuracy not lower", "images": 40,
                           "val_accuracy_as_trained": 0.9, "val_accuracy_with_adabn": 0.9333},
                 "prediction_entropy": {"before_phase_2": null, "as_trained": 0.41,
                                        "with_adabn": 0.38}},
  "state_source": "ema_state",
  "optimization": {"tool": "onnxruntime", "applied": true, "nodes_before": 121,
                   "nodes_after": 69},
  "calibration": {"temperature": 1.37, "ece_before": 0.081, "ece_after": 0.022,
                  "nll_before": 0.31, "nll_after": 0.24, "count": 30, "ece_bins": 15},
  "val_class_counts": [10, 10, 10],
  "abstention": {"threshold": 0.61, "target_precision": 0.95, "precision": 0.96,
                 "coverage": 0.83, "count": 30},
  "golden_set": {"images": 31, "tolerance": 0.01, "measured_max_abs_diff": 0.0008}
}
"""

# An older release: before calibration, abstention, drift counts and the golden set (and
# before the export recorded which weights it used or whether it optimised the graph).
OLDER_RELEASE = """
{
  "labels": ["cat", "dog"],
  "input_format": "float32-nchw",
  "input_size": [64, 64],
  "resize_size": 73,
  "mean": [0.5, 0.5, 0.5],
  "std": [0.25, 0.25, 0.25],
  "precision": "int8",
  "arch": "mobilenet_v3_small",
  "weights": "none",
  "training": {"best_val_accuracy": 0.75, "epochs": {"head": 1, "finetune": 0}},
  "dataset_fingerprint": {"classes": ["cat", "dog"], "file_count": 12, "sha256": "ab12"},
  "parity": {"max_abs_diff_logits": 0.05, "tolerance": null, "batch_sizes": [1, 3, 17]},
  "exporter": "torch.onnx.export(dynamo=False)",
  "versions": {"python": "3.11.9", "torch": "2.4.1"},
  "git_commit": "0123456789abcdef0123456789abcdef01234567",
  "created_at": "2025-06-01T12:00:00+00:00",
  "int8": {"mode": "static", "calibration_images": 12, "accuracy_budget_points": 1.0},
  "precision_comparison": {"reference": "fp32", "val_accuracy_fp32": 0.75,
                           "val_accuracy": 0.75, "val_accuracy_delta_points": 0.0,
                           "val_images": 12, "cpu_latency_ratio": 0.6, "latency_batch": 8},
  "parity_fp32": {"max_abs_diff_logits": 1e-06, "tolerance": 0.0001, "batch_sizes": [1, 3]}
}
"""


def _write(directory: Path, text: str) -> Path:
    path = directory / "model.json"
    path.write_text(text)
    return path


def test_the_previous_release_s_model_json_loads_every_key(tmp_path: Path) -> None:
    metadata = read_model_metadata(_write(tmp_path, PREVIOUS_RELEASE))
    assert metadata.format_version == 1
    assert metadata.labels == ("cat", "dog", "fox")
    assert metadata.input_format == UINT8_NHWC
    assert metadata.preprocessing == Preprocessing((224, 224), 256)
    assert metadata.precision == "fp32" and metadata.arch == "resnet18"
    assert metadata.temperature == 1.37
    assert metadata.calibration == TemperatureCalibration(1.37, 0.081, 0.022, 0.31, 0.24, 30, 15)
    assert metadata.abstention_threshold == 0.61
    assert metadata.abstention == Abstention(0.61, 0.95, 0.96, 0.83, 30)
    assert metadata.val_class_counts == (10, 10, 10)
    assert metadata.golden_set == {"images": 31, "tolerance": 0.01, "measured_max_abs_diff": 0.0008}
    assert metadata.adaptation is not None and metadata.adaptation["adabn"]["kept"] is True
    assert metadata.other == {}
    # Written back, it is the same document plus the format version.
    assert metadata.to_dict() == {"format_version": 1, **json.loads(PREVIOUS_RELEASE)}


def test_an_older_model_json_without_the_newer_keys_loads_with_their_defaults(
    tmp_path: Path,
) -> None:
    metadata = read_model_metadata(_write(tmp_path, OLDER_RELEASE))
    assert metadata.input_format == FLOAT32_NCHW
    assert metadata.preprocessing == Preprocessing((64, 64), 73, (0.5,) * 3, (0.25,) * 3)
    assert metadata.calibration is None and metadata.temperature == 1.0
    assert metadata.abstention is None and metadata.abstention_threshold == 0.0
    assert metadata.val_class_counts is None and metadata.golden_set is None
    assert metadata.int8 == {
        "mode": "static",
        "calibration_images": 12,
        "accuracy_budget_points": 1.0,
    }
    document = metadata.to_dict()
    assert {k: v for k, v in document.items() if v is not None} == {
        "format_version": 1,
        **json.loads(OLDER_RELEASE),
    }


def test_a_minimal_document_means_the_defaults() -> None:
    metadata = ModelMetadata.from_dict({})
    assert metadata.labels == () and metadata.preprocessing is None
    assert metadata.input_format == UINT8_NHWC and metadata.temperature == 1.0
    assert metadata.format_version == 1


def test_a_round_trip_keeps_unknown_keys() -> None:
    document = {"labels": ["a"], "input_size": [8, 8], "from_a_newer_exporter": {"x": 1}}
    metadata = ModelMetadata.from_dict(document)
    assert metadata.other == {"from_a_newer_exporter": {"x": 1}}
    assert ModelMetadata.from_dict(metadata.to_dict()) == metadata
    assert metadata.to_dict()["from_a_newer_exporter"] == {"x": 1}


def test_the_file_and_the_metadata_props_hold_the_same_document(tmp_path: Path) -> None:
    metadata = ModelMetadata.from_dict(json.loads(PREVIOUS_RELEASE))
    path = tmp_path / "model.json"
    path.write_bytes(metadata.to_json_bytes())
    assert read_model_metadata(path) == metadata
    assert metadata_from_props(metadata.to_metadata_props()) == metadata
    # A graph the trainer did not export: neither labels nor a size.
    assert metadata_from_props({"producer": "someone else"}) is None
    # Another tool's entry that is not JSON is kept as its text.
    props = {**metadata.to_metadata_props(), "note": "plain text"}
    read_back = metadata_from_props(props)
    assert read_back is not None and read_back.other == {"note": "plain text"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": "cat"}, "labels must be a list of strings"),
        ({"labels": ["cat", 3]}, "labels must be a list of strings"),
        ({"input_format": "float16-nhwc"}, "input_format 'float16-nhwc' not in"),
        ({"input_size": [224]}, "input_size must be"),
        ({"resize_size": 100}, "resize_size 100 is smaller than the crop"),
        ({"calibration": {"temperature": 0}}, "calibration.temperature 0.0 is not a positive"),
        ({"calibration": {"temperature": "hot"}}, "calibration.temperature must be a finite"),
        ({"calibration": [1.5]}, "calibration must be a JSON object"),
        ({"abstention": {"threshold": "high"}}, "abstention.threshold 'high' must be a number"),
        ({"abstention": {"threshold": 1.5}}, r"abstention.threshold 1.5 is not in \[0, 1\]"),
        ({"abstention": {"threshold": 0.5, "count": -1}}, "abstention.count must be a whole"),
        ({"val_class_counts": [1, 2]}, "val_class_counts must be 3 counts, one a label"),
        ({"val_class_counts": [1, 2, -3]}, "val_class_counts must be 3 counts"),
        ({"val_class_counts": 3}, "val_class_counts must be 3 counts"),
        ({"arch": 18}, "arch must be a string"),
        ({"parity": [1e-6]}, "parity must be a JSON object"),
        ({"format_version": METADATA_FORMAT_VERSION + 1}, "format_version 2 is not one this"),
        ({"format_version": "1"}, "format_version must be a whole number"),
    ],
)
def test_a_malformed_key_is_named(tmp_path: Path, change: dict, message: str) -> None:
    document = {**json.loads(PREVIOUS_RELEASE), **change}
    path = _write(tmp_path, json.dumps(document))
    with pytest.raises(InvalidModelMetadata, match=message) as raised:
        read_model_metadata(path)
    assert str(raised.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[1, 2]", "expected a JSON object, found list"),
        (b"{", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_an_unreadable_file_is_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.json"
    path.write_bytes(content)
    with pytest.raises(InvalidModelMetadata, match=message):
        read_model_metadata(path)


def test_a_file_over_the_bound_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    with path.open("wb") as handle:
        handle.truncate(MAX_METADATA_BYTES + 1)  # sparse: no memory, no disk
    with pytest.raises(InvalidModelMetadata, match=f"larger than {MAX_METADATA_BYTES} bytes"):
        read_model_metadata(path)
    with pytest.raises(InvalidModelMetadata, match=re.escape(str(tmp_path / "absent.json"))):
        read_model_metadata(tmp_path / "absent.json")


def test_nan_cannot_be_written() -> None:
    metadata = ModelMetadata(labels=("a",), parity={"max_abs_diff_logits": float("nan")})
    with pytest.raises(ValueError, match="JSON compliant"):
        metadata.to_json_bytes()
    with pytest.raises(InvalidModelMetadata, match=r"calibration\.temperature"):
        TemperatureCalibration(temperature=float("nan"))
