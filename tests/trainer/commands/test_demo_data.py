"""The embedded demo data: layout, determinism, and that it is a visual task, not a colour one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.commands.demo_data import SOURCE_CLASSES, TARGET_CLASSES, DemoDataSpec, make_demo_data
from trainer.errors import UsageError

SMALL = DemoDataSpec(seed=3, image_size=32, source_train_per_class=8, target_train_per_class=4,
                     val_per_class=4)  # fmt: skip


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_writes_both_tasks_with_train_and_val_splits(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert make_demo_data(out, SMALL) is True
    for task, classes, train_count in (
        ("source", SOURCE_CLASSES, 8),
        ("target", TARGET_CLASSES, 4),
    ):
        for split, count in (("train", train_count), ("val", 4)):
            folders = sorted(p.name for p in (out / task / split).iterdir())
            assert folders == sorted(classes)
            for name in folders:
                images = list((out / task / split / name).iterdir())
                assert len(images) == count
                with Image.open(images[0]) as image:
                    assert image.size == (32, 32)
    assert set(SOURCE_CLASSES).isdisjoint(TARGET_CLASSES), "the target task must be a new task"
    suffixes = {p.suffix for p in _files(out)}
    assert suffixes == {".jpg", ".png", ".webp", ".bmp"}


def test_same_seed_same_pixels_and_rerun_is_a_no_op(tmp_path: Path) -> None:
    make_demo_data(tmp_path / "a", SMALL)
    make_demo_data(tmp_path / "b", SMALL)
    first = tmp_path / "a" / "source" / "val" / "star"
    second = tmp_path / "b" / "source" / "val" / "star"
    for x, y in zip(sorted(first.iterdir()), sorted(second.iterdir()), strict=True):
        assert np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y)))
    assert make_demo_data(tmp_path / "a", SMALL) is False


def test_refuses_to_write_over_other_content(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        make_demo_data(tmp_path, SMALL)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"], "no staging left behind"


def test_classes_are_not_separable_by_mean_colour(tmp_path: Path) -> None:
    spec = DemoDataSpec(seed=0, image_size=32, source_train_per_class=40,
                        target_train_per_class=4, val_per_class=20)  # fmt: skip
    make_demo_data(tmp_path, spec)
    classes = sorted(SOURCE_CLASSES)

    def mean_colours(split: str) -> tuple[np.ndarray, np.ndarray]:
        features, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((tmp_path / "source" / split / name).iterdir()):
                with Image.open(path) as image:
                    features.append(np.asarray(image.convert("RGB"), np.float64).mean((0, 1)))
                labels.append(label)
        return np.array(features), np.array(labels)

    train_x, train_y = mean_colours("train")
    val_x, val_y = mean_colours("val")
    centroids = np.stack([train_x[train_y == k].mean(0) for k in range(len(classes))])
    predicted = np.argmin(((val_x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float((predicted == val_y).mean())
    # Chance is 0.2 for five classes; a mean-colour classifier must stay near it.
    assert accuracy < 0.4, f"mean colour alone classifies {accuracy:.0%} of the val images"


def test_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["--image-size", "16", "--source-train-per-class", "2", "--target-train-per-class",
            "1", "--val-per-class", "1"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "make-demo-data", str(out), *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "target" / "val" / "ring").is_dir()
    bad = subprocess.run(
        [sys.executable, "-m", "trainer", "make-demo-data", str(out), "--image-size", "0"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--image-size" in bad.stderr
