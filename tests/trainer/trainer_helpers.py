"""Builders shared by the trainer tests: tiny image folders and configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from trainer.config import TrainConfig, resolve_config

FORMATS = ("png", "jpg", "bmp", "webp")


def make_image_folder(  # noqa: PLR0913  each argument is one property of the generated folder
    root: Path,
    classes: tuple[str, ...] = ("circle", "square", "triangle"),
    train_per_class: int = 8,
    val_per_class: int | None = 3,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> Path:
    """``root/train/<class>/*`` (and ``val/`` unless None): noise with a class-coloured tint."""
    rng = np.random.default_rng(seed)
    splits = {"train": train_per_class}
    if val_per_class is not None:
        splits["val"] = val_per_class
    for split, count in splits.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
                pixels[..., label % 3] += 150
                Image.fromarray(pixels).save(folder / f"{name}-{i}.{FORMATS[i % len(FORMATS)]}")
    return root


def tiny_config(data: Path, output: Path, **overrides: Any) -> TrainConfig:
    """A fast CPU config: 32 px, small batches, no export, fp32, no environment."""
    flags: dict[str, Any] = {
        "data": data,
        "output": output,
        "arch": "resnet18",
        "weights": "none",
        "image_size": 32,
        "batch_size": 4,
        "head_epochs": 0,
        "finetune_epochs": 1,
        "export": False,
        "amp": "off",
        "device": "cpu",
    }
    flags.update(overrides)
    return resolve_config(environ={}, flags=flags)


def tiny_train_args(data: Path, output: Path, *, batch_size: int, extra: tuple[str, ...] = ()):
    """`trainer train` arguments of a tiny from-scratch run: 32 px, no mixed precision."""
    return [
        "train",
        "--data", str(data),
        "--output", str(output),
        "--weights", "none",
        "--image-size", "32",
        "--batch-size", str(batch_size),
        "--amp", "off",
        *extra,
    ]  # fmt: skip


def make_capture_folder(root: Path, count: int = 5, corrupt: int = 1, seed: int = 0) -> Path:
    """The server's capture layout: ``unlabeled/<label>/*.jpg`` with ``.json`` sidecars, and
    ``corrupt`` files that are not images under an image name."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / "unlabeled" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")
        (folder / f"{i:04d}.json").write_text(json.dumps({"label": "a", "score": 0.4}))
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    for i in range(corrupt):
        (root / "unlabeled" / f"broken-{i}.jpg").write_bytes(b"not a jpeg at all")
    return root
