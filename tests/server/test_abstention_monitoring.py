"""Abstention, production metrics and capture, through a real server and Classify over gRPC."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config

from client.api import InferenceClient
from protocol.finetune.v1 import classifier_pb2 as pb
from protocol.finetune.v1 import classifier_pb2_grpc as pb_grpc
from server.errors import ConfigError

RESIZE, CROP = 36, 32  # the fixture model's preprocessing


def _images(count: int) -> tuple[list[bytes], list[np.ndarray]]:
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 256, (RESIZE, RESIZE, 3), dtype=np.uint8) for _ in range(count)]
    encoded = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded, arrays


def _top_probabilities(repo: Path, arrays: list[np.ndarray]) -> np.ndarray:
    offset = (RESIZE - CROP) // 2
    batch = np.stack([a[offset : offset + CROP, offset : offset + CROP] for a in arrays])
    session = ort.InferenceSession(
        str(repo / "classifier" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(["probabilities"], {"image": batch})[0].max(axis=1)


def _repository(tmp_path: Path, threshold: float, val_counts: list[int] | None) -> Path:
    repo = make_model_repository(tmp_path / "models", num_classes=4)
    _set_metadata(repo, threshold, val_counts)
    return repo


def _set_metadata(repo: Path, threshold: float, val_counts: list[int] | None) -> None:
    path = repo / "classifier" / "1" / "model.json"
    document = json.loads(path.read_text())
    document["abstention"] = {"threshold": threshold, "target_precision": 0.95, "coverage": 0.5}
    if val_counts is not None:
        document["val_class_counts"] = val_counts
    path.write_text(json.dumps(document))


def test_abstains_below_the_versions_threshold_and_counts_it(tmp_path: Path) -> None:
    images, arrays = _images(6)
    repo = make_model_repository(tmp_path / "models", num_classes=4)
    top = _top_probabilities(repo, arrays)
    threshold = float(np.median(top))  # half the images fall below it
    _set_metadata(repo, threshold, [5, 5, 5, 5])
    with RunningServer(server_config(repo)) as server:
        with InferenceClient(server.target) as client:
            results = client.classify_images(images)
            overridden = client.classify_images(images, abstention_threshold=0.0)
        labels = {"model": "classifier", "version": "1"}
        served = sum(
            server.sample("classification_predictions_total", {**labels, "label": f"class_{i}"})
            for i in range(4)
        )
        abstentions = server.sample("classification_abstentions_total", labels)
        histogram_count = server.sample("classification_top_probability_count", labels)
        drift = server.registry.get_sample_value("classification_class_drift_psi", labels)
    assert [r.abstained for r in results] == [bool(p < threshold) for p in top]
    assert any(r.abstained for r in results) and not all(r.abstained for r in results)
    assert all(r.abstention_threshold == pytest.approx(threshold) for r in results)
    assert not any(r.abstained for r in overridden)
    assert served == 12 and histogram_count == 12
    assert abstentions == sum(r.abstained for r in results)
    assert drift is not None and math.isnan(drift)  # the window (1000) is not full yet


def test_a_threshold_outside_0_1_is_invalid_argument(tmp_path: Path) -> None:
    repo = _repository(tmp_path, threshold=0.5, val_counts=None)
    images, _ = _images(1)
    request = pb.ClassifyRequest(images=images, abstention_threshold=1.5)
    with (
        RunningServer(server_config(repo)) as server,
        grpc.insecure_channel(server.target) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        pb_grpc.ClassifierStub(channel).Classify(request, timeout=10)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "abstention_threshold" in error.value.details()


def test_uncertain_images_are_captured_for_review(tmp_path: Path) -> None:
    repo = _repository(tmp_path, threshold=1.0, val_counts=None)  # abstain on everything
    captures = tmp_path / "captures"
    images, _ = _images(3)
    config = server_config(repo, capture_dir=captures, capture_per_second=100.0)
    with RunningServer(config) as server, InferenceClient(server.target) as client:
        assert all(r.abstained for r in client.classify_images(images))
    # Stopping the server writes what the capture queue still holds.
    captured = server.sample("classification_captures_total", {"reason": "abstained"})
    written = sorted((captures / "unlabeled").rglob("*.png"))
    assert captured == 3 and len(written) == 3
    assert {p.read_bytes() for p in written} == set(images)
    sidecar = json.loads(written[0].with_suffix(".png.json").read_text())
    assert sidecar["reason"] == "abstained" and sidecar["model"] == "classifier"


def test_a_clients_threshold_changes_its_answer_not_what_is_captured(tmp_path: Path) -> None:
    repo = _repository(tmp_path, threshold=0.0, val_counts=None)  # the version never abstains
    captures = tmp_path / "captures"
    images, _ = _images(3)
    config = server_config(
        repo,
        capture_dir=captures,
        capture_per_second=100.0,
        capture_margin=0.0,
        capture_random_share=0.0,
    )
    with RunningServer(config) as server, InferenceClient(server.target) as client:
        forced = client.classify_images(images, abstention_threshold=1.0)
    assert all(r.abstained for r in forced)  # the client asked, and is answered so
    captured = server.sample("classification_captures_total", {"reason": "abstained"})
    assert not captured
    assert not list((captures / "unlabeled").rglob("*.png"))


def test_an_unwritable_capture_directory_fails_start_up(tmp_path: Path) -> None:
    repo = _repository(tmp_path, threshold=0.5, val_counts=None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="capture_dir"):
        RunningServer(server_config(repo, capture_dir=tmp_path / "file" / "captures"))


def test_a_malformed_abstention_entry_rejects_the_version(tmp_path: Path) -> None:
    from contracts.model_metadata import InvalidModelMetadata, ModelMetadata

    base = {"labels": ["a", "b"], "input_size": [32, 32], "resize_size": 36}
    for bad, message in (
        ({"abstention": {"threshold": "high"}}, "abstention.threshold"),
        ({"abstention": {"threshold": 2.0}}, "not in"),
        ({"val_class_counts": [1]}, "val_class_counts"),
    ):
        with pytest.raises(InvalidModelMetadata, match=message):
            ModelMetadata.from_dict({**base, **bad})
    parsed = ModelMetadata.from_dict({**base, "val_class_counts": [3, 4]})
    assert parsed.abstention_threshold == 0.0
    assert parsed.val_class_counts == (3, 4)
