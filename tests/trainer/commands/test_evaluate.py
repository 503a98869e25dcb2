"""``trainer evaluate``: both engines on one folder, the measures, and the errors that exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_helpers import make_image_folder, tiny_config

from trainer.cli import main
from trainer.commands.demo_data import DemoDataSpec, make_demo_data
from trainer.commands.evaluate import ModelUnderTest, evaluate_folder
from trainer.run import train

# The documented keys of evaluation.json (docs/trainer.md).
KEYS = {
    "engine",
    "model",
    "data",
    "classes",
    "images",
    "skipped",
    "skipped_files",
    "top1_accuracy",
    "top5_accuracy",
    "ece",
    "ece_bins",
    "nll",
    "temperature",
    "macro_avg",
    "weighted_avg",
    "per_class",
    "confusion",
}
VAL_PER_CLASS = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run on the demo's source task (5 classes): calibrated, exported, one epoch."""
    root = tmp_path_factory.mktemp("evaluate")
    spec = DemoDataSpec(
        image_size=32,
        source_train_per_class=8,
        target_train_per_class=1,
        val_per_class=VAL_PER_CLASS,
    )
    make_demo_data(root / "data", spec)
    train(tiny_config(root / "data" / "source", root / "run", export=True, batch_size=8))
    return root


def _evaluate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _checkpoint(root: Path) -> str:
    return str(root / "run" / "checkpoints" / "best.pt")


def _repository(root: Path) -> str:
    return str(root / "run" / "model_repository")


@pytest.mark.slow
def test_pytorch_and_onnx_engines_agree(trained: Path, tmp_path: Path, capsys) -> None:
    val = trained / "data" / "source" / "val"
    code, out, _ = _evaluate(
        capsys,
        "--checkpoint",
        _checkpoint(trained),
        "--data",
        str(val),
        "--output",
        str(tmp_path / "pt"),
    )
    assert code == 0
    assert "top-1 accuracy" in out and "confusion matrix" in out and "precision" in out
    by_torch = json.loads((tmp_path / "pt" / "evaluation.json").read_text())
    with Image.open(tmp_path / "pt" / "confusion.png") as figure:
        assert figure.format == "PNG"
    by_onnx = {}
    for batch in ("32", "7"):  # two batch sizes: a fixed batch dimension would show here
        code, _, _ = _evaluate(
            capsys,
            "--model-repository",
            _repository(trained),
            "--data",
            str(val),
            "--batch-size",
            batch,
            "--output",
            str(tmp_path / f"onnx-{batch}"),
        )
        assert code == 0
        by_onnx[batch] = json.loads((tmp_path / f"onnx-{batch}" / "evaluation.json").read_text())
    assert by_onnx["7"]["confusion"] == by_onnx["32"]["confusion"]
    onnx = by_onnx["32"]

    images = 5 * VAL_PER_CLASS
    for document in (by_torch, onnx):
        assert set(document) == KEYS
        assert document["images"] == images and document["skipped"] == 0
        assert np.asarray(document["confusion"]).sum() == images
        assert [row["support"] for row in document["per_class"].values()] == [VAL_PER_CLASS] * 5
        assert document["top5_accuracy"] is None  # 5 classes: top-5 says nothing
        assert document["ece_bins"] == 15
    assert by_torch["engine"] == "pytorch" and onnx["engine"] == "onnxruntime"
    assert onnx["model"]["version"] == 1
    # Decoding and resizing differ (torchvision vs Pillow), the predictions barely.
    assert abs(by_torch["top1_accuracy"] - onnx["top1_accuracy"]) * images <= 1
    assert by_torch["ece"] == pytest.approx(onnx["ece"], abs=0.03)
    assert by_torch["nll"] == pytest.approx(onnx["nll"], abs=0.03)
    # The val split is the one the temperature was fitted on: the run measured the same.
    calibration = json.loads((trained / "run" / "summary.json").read_text())["calibration"]
    assert (
        by_torch["temperature"]
        == onnx["temperature"]
        == pytest.approx(calibration["temperature"], rel=1e-5)
    )
    assert by_torch["nll"] == pytest.approx(calibration["nll_after"], abs=1e-3)
    assert by_torch["ece"] == pytest.approx(calibration["ece_after"], abs=1e-3)


@pytest.mark.slow
def test_unreadable_and_unsupported_files_are_skipped_and_counted(
    trained: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "val"
    shutil.copytree(trained / "data" / "source" / "val", data)
    (data / "circle" / "broken.png").write_bytes(b"not an image")
    (data / "star" / "anim.gif").write_bytes(b"GIF89a")
    for source in ("--checkpoint", "--model-repository"):
        path = _checkpoint(trained) if source == "--checkpoint" else _repository(trained)
        out = tmp_path / source.strip("-")
        code, printed, err = _evaluate(
            capsys, source, path, "--data", str(data), "--output", str(out)
        )
        assert code == 0, err
        document = json.loads((out / "evaluation.json").read_text())
        assert document["images"] == 5 * VAL_PER_CLASS
        assert document["skipped"] == 2
        assert any("broken.png" in line for line in document["skipped_files"])
        assert any("anim.gif: not a supported image format" in x for x in document["skipped_files"])
        assert "2 file(s) skipped" in printed
        assert "skipped 2 unreadable image(s)" in err  # logged as training logs it


@pytest.mark.slow
def test_class_mismatch_exits_2_naming_the_classes(trained: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "val"
    shutil.copytree(trained / "data" / "source" / "val", data)
    (data / "star").rename(data / "sun")
    for source, path in (
        ("--checkpoint", _checkpoint(trained)),
        ("--model-repository", _repository(trained)),
    ):
        code, out, err = _evaluate(capsys, source, path, "--data", str(data))
        assert code == 2
        assert out == ""
        (line,) = err.strip().splitlines()
        assert line.startswith("trainer: error: data:")
        assert "missing: ['star']" in line and "not classes of the model: ['sun']" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing data", "does not exist or is not a directory"),
        ("empty class", "has no images"),
        ("whole dataset", "point --data at one split"),
        ("unreadable checkpoint", "cannot be read"),
        ("weights that do not fit", "does not fit resnet18 with 5 classes"),
        ("missing version", "has no version 9 with model.onnx (complete versions: [1])"),
        ("missing model", "has no model 'other'"),
        ("version of a checkpoint", "--model and --version choose a version"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    trained: Path, tmp_path: Path, capsys, case: str, message: str
) -> None:
    val = trained / "data" / "source" / "val"
    data, model = str(val), ["--checkpoint", _checkpoint(trained)]
    if case == "missing data":
        data = str(tmp_path / "nope")
    elif case == "empty class":
        shutil.copytree(val, tmp_path / "val")
        shutil.rmtree(tmp_path / "val" / "cross")
        (tmp_path / "val" / "cross").mkdir()
        data = str(tmp_path / "val")
    elif case == "whole dataset":
        data = str(trained / "data" / "source")
    elif case == "unreadable checkpoint":
        (tmp_path / "best.pt").write_bytes(b"\x00" * 64)
        model = ["--checkpoint", str(tmp_path / "best.pt")]
    elif case == "weights that do not fit":
        document = torch.load(_checkpoint(trained), weights_only=True)
        del document["model_state"]["fc.weight"]
        torch.save(document, tmp_path / "best.pt")
        model = ["--checkpoint", str(tmp_path / "best.pt")]
    elif case == "missing version":
        model = ["--model-repository", _repository(trained), "--version", "9"]
    elif case == "missing model":
        model = ["--model-repository", _repository(trained), "--model", "other"]
    elif case == "version of a checkpoint":
        model = [*model, "--version", "1"]
    code, out, err = _evaluate(capsys, *model, "--data", data)
    assert code == 2
    assert out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("trainer: error: ") and message in line


def test_model_and_repository_are_exclusive(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", "a.pt", "--model-repository", "r", "--data", "d"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_top5_and_the_measures_on_a_known_model(tmp_path: Path) -> None:
    # Seven classes; a stand-in model (no engine involved) ranks the true class by a rule,
    # so every measure has a value known in advance.
    classes = tuple(f"c{i}" for i in range(7))
    data = make_image_folder(tmp_path, classes=classes, train_per_class=2, val_per_class=None)
    index = {name: i for i, name in enumerate(classes)}

    def load_image(path: Path) -> np.ndarray:
        # the class index, and which of the class's images this is
        return np.array([[[index[path.parent.name], int(path.stem.split("-")[-1]), 0]]], np.uint8)

    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = np.zeros((len(images), 7), np.float32)
        for row, image in enumerate(images):
            label, number = int(image[0, 0, 0]), int(image[0, 0, 1])
            logits[row, label] = 1.0
            if number == 1:  # the second image of each class: true class ranked 3rd
                logits[row, (label + 1) % 7] = 3.0
                logits[row, (label + 2) % 7] = 2.0
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return logits, probabilities

    model = ModelUnderTest("stand-in", {}, classes, 1.0, load_image, score)
    evaluation = evaluate_folder(model, data / "train", batch_size=3)
    assert evaluation.images == 14
    assert evaluation.top1 == pytest.approx(0.5)
    assert evaluation.top5 == pytest.approx(1.0)
    assert evaluation.confusion.sum() == 14
    assert np.trace(evaluation.confusion) == 7
    assert evaluation.confusion[0, 1] == 1  # c0's second image predicted as c1
    assert evaluation.scores["per_class"]["c0"]["recall"] == pytest.approx(0.5)
    plain = np.exp(1.0) / (np.exp(1.0) + 6)  # right, the only non-zero logit
    ranked = np.exp([3.0, 2.0, 1.0]).sum() + 4
    confident, true_third = np.exp(3.0) / ranked, np.exp(1.0) / ranked  # wrong
    assert evaluation.nll == pytest.approx(-(np.log(plain) + np.log(true_third)) / 2, rel=1e-6)
    # ECE: half the images right at confidence `plain`, half wrong at `confident`
    assert evaluation.ece == pytest.approx(((1 - plain) + confident) / 2, rel=1e-5)
