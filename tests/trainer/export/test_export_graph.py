"""The exported wrapper, the legacy exporter fallback path and the offline optimisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as tvf

from trainer.export.graph import ServingModel
from trainer.export.onnx_export import _export_legacy, example_input
from trainer.export.optimize import optimize_offline
from trainer.export.ort_checks import GraphInput
from trainer.export.verify import check_model, check_signature, torch_parity

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()


def test_in_graph_preprocessing_matches_torchvision():
    classifier = _tiny_classifier()
    wrapper = ServingModel(classifier, input_format="uint8-nhwc", mean=MEAN, std=STD).eval()
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    # What a torchvision eval pipeline does to the same pixels: CHW, scale to [0, 1], Normalize.
    chw = tvf.to_dtype(images.permute(0, 3, 1, 2), torch.float32, scale=True)
    expected = classifier(tvf.normalize(chw, MEAN, STD))
    with torch.no_grad():
        logits, probabilities = wrapper(images)
    torch.testing.assert_close(logits, expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2))


def test_unknown_input_format_is_refused():
    with pytest.raises(ValueError, match="input_format"):
        ServingModel(_tiny_classifier(), input_format="bgr", mean=MEAN, std=STD)


def test_legacy_exporter_graph_is_verified_and_optimised(tmp_path: Path):
    classifier = _tiny_classifier()
    wrapper = ServingModel(classifier, input_format="uint8-nhwc", mean=MEAN, std=STD).eval()
    exported = tmp_path / "legacy.onnx"
    _export_legacy(wrapper, example_input("uint8-nhwc", (16, 16)), exported)
    check_signature(
        check_model(exported), input_format="uint8-nhwc", input_size=[16, 16], num_classes=3
    )

    optimized = tmp_path / "optimized.onnx"
    report = optimize_offline(exported, optimized)
    # The legacy exporter leaves constants that onnxruntime's basic level folds away.
    assert report.is_smaller
    model = check_model(optimized)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    check_signature(model, input_format="uint8-nhwc", input_size=[16, 16], num_classes=3)
    parity = torch_parity(
        optimized,
        classifier,
        graph_input=GraphInput("uint8-nhwc", MEAN, STD),
        input_size=[16, 16],
        val_images=np.zeros((1, 16, 16, 3), np.uint8),
    )
    assert parity.max_abs_diff_logits <= 1e-4
    assert set(parity.per_source) == {f"{s}@{b}" for s in ("random", "val") for b in (1, 3, 17)}
    assert onnx.load(str(optimized)).graph.input[0].name == "image"
