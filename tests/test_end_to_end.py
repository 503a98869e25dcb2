"""Walking skeleton: demo data -> `trainer train` (with export) -> real server -> client.

Everything is real: torch training, the dynamo ONNX export, onnxruntime, a grpc.aio server on
a loopback port the OS chose, and the client library over the wire.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from server_harness import RunningServer, server_config

from client import ConnectionOptions, InferenceClient
from client.cli import main as client_main
from contracts.golden_set import read_golden_set
from trainer.checkpoint import load_checkpoint
from trainer.commands.demo_data import DemoDataSpec, make_demo_data
from trainer.data.augment import eval_transform
from trainer.data.folders import decode_image
from trainer.model.classifier import restore_classifier

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
        # One epoch from scratch on 24 images is near chance, and calibration rightly turns
        # such a model's answers into a uniform guess: every golden image would then sit on
        # the decision boundary and the set would be empty. The pipeline is what is tested
        # here; calibration has its own tests.
        "--calibrate", "off",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return root


def _torch_probabilities(run: Path, images: list[Path]) -> np.ndarray:
    """What the trained PyTorch model says, with the trainer's own decode and eval transform."""
    checkpoint = load_checkpoint(run / "checkpoints" / "best.pt")
    model, _source = restore_classifier(checkpoint)
    pre = checkpoint.header.preprocessing
    transform = eval_transform(pre)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    batch = torch.stack([transform(decode_image(p)) for p in images])
    temperature = checkpoint.temperature
    with torch.no_grad():
        logits = model((batch.float() / 255 - mean) / std)
    return torch.softmax(logits / temperature, dim=1).numpy()


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


def _version_dir(run: Path) -> tuple[Path, dict]:
    summary = json.loads((run / "run" / "summary.json").read_text())
    model_dir = Path(summary["model_repository"]) / summary["model_name"]
    return model_dir / str(summary["model_version"]), summary


def _modes(source: Path, root: Path) -> list[Path]:
    """One val image as a rotated-EXIF JPEG, a 16-bit PNG, a CMYK JPEG and a palette PNG with
    transparency: each mode takes the one conversion (to_rgb8) in the trainer and the server."""
    root.mkdir()
    with Image.open(source) as opened:
        rgb = opened.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; upright after the EXIF rotation
    rgb.transpose(Image.Transpose.ROTATE_90).save(
        root / "rotated.jpg", quality=95, exif=exif.tobytes()
    )
    grey16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(root / "grey16.png")
    rgb.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.save(root / "palette.png", transparency=0)
    return [root / name for name in ("rotated.jpg", "grey16.png", "cmyk.jpg", "palette.png")]


def test_image_modes_classified_alike_by_trainer_and_server(
    trained_run: Path, tmp_path: Path
) -> None:
    version_dir, summary = _version_dir(trained_run)
    golden = read_golden_set(version_dir)
    assert golden is not None
    tolerance = golden[0].tolerance
    labels = summary["classes"]
    sources = sorted((trained_run / "data" / "target" / "val").glob("*/*-0000.*"))
    images = [p for i, s in enumerate(sources) for p in _modes(s, tmp_path / str(i))]
    expected = _torch_probabilities(trained_run / "run", images)
    repository = Path(summary["model_repository"])
    with (
        RunningServer(server_config(repository)) as running,
        InferenceClient(ConnectionOptions(target=running.target)) as client,
    ):
        results = client.classify([p.read_bytes() for p in images], top_k=len(labels))
    for path, predictions, torch_probs in zip(images, results, expected, strict=True):
        served = np.zeros(len(labels))
        for prediction in predictions:
            served[prediction.index] = prediction.score
        np.testing.assert_allclose(served, torch_probs, atol=tolerance, err_msg=str(path))
        margin = np.diff(np.sort(torch_probs)[-2:])[0]
        if margin > 2 * tolerance:  # off the decision boundary, the top-1 must agree
            assert int(np.argmax(served)) == int(np.argmax(torch_probs)), path


def test_golden_set_passes_at_load_and_through_client_verify(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version_dir, summary = _version_dir(trained_run)
    found = read_golden_set(version_dir)
    assert found is not None and found[0].images
    repository = Path(summary["model_repository"])
    with RunningServer(server_config(repository)) as running:
        name = summary["model_name"]
        assert not running.sample("model_golden_set_failures_total", {"model": name})
        arguments = ["verify", "--target", running.target, "--model", name]
        assert client_main([*arguments, "--repository", str(repository)]) == 0
    assert capsys.readouterr().out.startswith(f"PASS model {name} version ")


def test_tampered_resize_size_is_refused(trained_run: Path, tmp_path: Path) -> None:
    # A wrong mean only matters to a float32-nchw graph (a uint8 graph normalises inside
    # itself); the server tests cover it with one.
    version_dir, summary = _version_dir(trained_run)
    repository = tmp_path / "models"
    model_dir = repository / summary["model_name"]
    shutil.copytree(version_dir.parent, model_dir)
    tampered = model_dir / str(int(version_dir.name) + 1)
    shutil.copytree(version_dir, tampered)
    document = json.loads((tampered / "model.json").read_text())
    document["resize_size"] = 64
    (tampered / "model.json").write_text(json.dumps(document))
    with RunningServer(server_config(repository)) as running:
        name = summary["model_name"]
        assert running.sample("model_golden_set_failures_total", {"model": name}) == 1
        with InferenceClient(ConnectionOptions(target=running.target)) as client:
            served = client.model_metadata(name).versions
    assert served == (version_dir.name,)
