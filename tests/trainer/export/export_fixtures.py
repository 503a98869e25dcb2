"""Builders shared by the export tests: real checkpoints of tiny models, a tiny ImageFolder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.model.classifier import create_model

CLASSES = ["circle", "square", "triangle"]
SIZE = 32
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def make_checkpoint(  # noqa: PLR0913  each keyword is one property of the generated checkpoint
    path: Path,
    arch: str,
    *,
    classes: list[str] = CLASSES,
    size: int = SIZE,
    ema: bool = False,
    seed: int = 0,
    head_hidden: int | None = None,
    model: torch.nn.Module | None = None,
) -> Path:
    """Write a checkpoint dict as ``trainer train`` does (random weights)."""
    torch.manual_seed(seed)
    if model is None:
        model = create_model(arch, len(classes), head_hidden=head_hidden, head_dropout=0.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ema_state = None
    if ema:
        # A distinguishable EMA: export must take these weights, not model_state.
        ema_state = {k: v.clone() for k, v in state.items()}
        for key, value in state.items():
            if value.is_floating_point():
                state[key] = torch.zeros_like(value)
    checkpoint: dict[str, Any] = {
        "format": "finetune-checkpoint",
        "format_version": 1,
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "head": {"hidden": head_hidden, "dropout": 0.0},
        "preprocessing": {
            "input_size": [size, size],
            "resize_size": size + size // 7,
            "mean": MEAN,
            "std": STD,
        },
        "weights": "none",
        "model_state": state,
        "ema_state": ema_state,
        "phase": "finetune",
        "epoch": 1,
        "step": 10,
        "global_epoch": 2,
        "optimizer_state": {},
        "scheduler_state": {},
        "scaler_state": None,
        "rng_state": {"torch": torch.get_rng_state()},
        "best_val_accuracy": 0.5,
        "epochs": {"head": 1, "finetune": 1},
        "dataset_fingerprint": {"classes": list(classes), "file_count": 12, "sha256": "0" * 64},
        "config": {"arch": arch},
    }
    torch.save(checkpoint, path)
    return path


def make_image_folder(
    root: Path, *, classes: list[str] = CLASSES, per_class: int = 4, size: int = 40, seed: int = 0
) -> Path:
    """``root/{train,val}/<class>/*.png``: noise images tinted per class."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                pixels[..., index % 3] = 255 - pixels[..., index % 3] // 4
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
