"""Walking skeleton: demo data -> `trainer train` (with export) -> real server -> client.

Everything is real: torch training, the dynamo ONNX export, onnxruntime, a grpc.aio server on
a loopback port the OS chose, and the client library over the wire.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from server_harness import RunningServer, server_config
from torchvision.io import decode_image

from server.client import ConnectionOptions, InferenceClient
from trainer.augment import eval_transform
from trainer.checkpoint import load_checkpoint
from trainer.classifier import restore_classifier
from trainer.demo_data import DemoDataSpec, make_demo_data

pytestmark = pytest.mark.slow

TINY = DemoDataSpec(seed=5, image_size=32, source_train_per_class=4, target_train_per_class=6,
                    val_per_class=3)  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    make_demo_data(root / "data", TINY)
    command = [
        sys.executable, "-m", "trainer", "train",
        "--data", str(root / "data" / "target"), "--output", str(root / "run"),
        "--arch", "resnet18", "--weights", "none", "--image-size", "32",
        "--batch-size", "8", "--finetune-epochs", "1", "--device", "cpu", "--seed", "0",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return root


def _torch_probabilities(run: Path, images: list[Path]) -> np.ndarray:
    """What the trained PyTorch model says, with the trainer's own eval preprocessing."""
    checkpoint = load_checkpoint(run / "checkpoints" / "best.pt")
    model, _source = restore_classifier(checkpoint)
    pre = checkpoint.header.preprocessing
    transform = eval_transform(pre)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    batch = torch.stack([transform(decode_image(str(p), mode="RGB")) for p in images])
    with torch.no_grad():
        logits = model((batch.float() / 255 - mean) / std)
    return torch.softmax(logits, dim=1).numpy()


def test_train_export_serve_classify(trained_run: Path) -> None:
    summary = json.loads((trained_run / "run" / "summary.json").read_text())
    repository = Path(summary["model_repository"])
    model_dir = repository / summary["model_name"]
    labels = (model_dir / "labels.txt").read_text().split()
    assert labels == summary["classes"] == ["arrow", "crescent", "l-shape", "ring"]
    assert (model_dir / str(summary["model_version"]) / "model.onnx").is_file()

    # PNG and JPEG only: the classification API takes JPEG, PNG and WebP.
    images = sorted((trained_run / "data" / "target" / "val").glob("*/*-000[01].*"))
    encoded = [p.read_bytes() for p in images]
    expected = _torch_probabilities(trained_run / "run", images)

    running = RunningServer(server_config(repository, metrics_port=0))
    try:
        with InferenceClient(ConnectionOptions(target=running.target)) as client:
            assert client.health() == "SERVING"
            results = client.classify(encoded, top_k=len(labels))
        version = str(summary["model_version"])
        model = {"model": summary["model_name"], "version": version}
        assert running.sample("inference_requests_total", {**model, "outcome": "success"}) == 1
        assert running.sample("inference_rows_total", model) == len(images)
    finally:
        running.stop()

    assert len(results) == len(images)
    for path, predictions, torch_probs in zip(images, results, expected, strict=True):
        assert sorted(p.label for p in predictions) == sorted(labels)
        served = np.array(
            [next(p.score for p in predictions if p.label == name) for name in labels]
        )
        # The server resizes with Pillow, the trainer with torchvision: a few grey levels apart.
        np.testing.assert_allclose(served, torch_probs, atol=0.03, err_msg=str(path))
        assert predictions[0].label == labels[int(np.argmax(served))]
        with Image.open(path) as image:
            assert image.size == (32, 32)
