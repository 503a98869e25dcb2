"""Calibrated export: ``probabilities`` = softmax(logits / T), T and ECE/NLL in model.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from export_fixtures import make_checkpoint

from trainer.export import export_checkpoint

CALIBRATION = {
    "temperature": 2.5,
    "ece_before": 0.2,
    "ece_after": 0.05,
    "nll_before": 1.2,
    "nll_after": 0.9,
    "count": 9,
    "ece_bins": 15,
}


def test_exported_probabilities_use_the_checkpoints_temperature(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "best.pt", "resnet18")
    document = torch.load(path, weights_only=False)
    document["calibration"] = CALIBRATION
    torch.save(document, path)
    result = export_checkpoint(path, tmp_path / "repo")
    metadata = json.loads((result.model_dir / "model.json").read_text())
    assert metadata["calibration"] == CALIBRATION
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    logits, probabilities = session.run(None, {session.get_inputs()[0].name: images})
    expected = torch.softmax(torch.from_numpy(logits) / 2.5, dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
