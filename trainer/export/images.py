"""Real images for verification, calibration and accuracy: an ImageFolder split, preprocessed
exactly as the serving graph expects (shorter side resized, centre crop, uint8 RGB NHWC)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.transforms.v2 import functional as tvf

from contracts.image_formats import IMAGE_EXTENSIONS
from trainer.errors import DataError
from trainer.image_decode import CorruptImage, open_rgb


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images (``[N, H, W, 3]`` uint8) and their class indices (``[N]`` int64)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def list_split(split_dir: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """Image files of ``split_dir/<class>/`` with the checkpoint's class index of each.

    Files are interleaved across classes (one of each class in turn), so any prefix of the
    list covers the classes evenly.

    Raises:
        DataError: the split is missing, empty, or has a class the checkpoint does not know.
    """
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is not a directory (expected an ImageFolder split)")
    index = {name: i for i, name in enumerate(classes)}
    per_class: list[list[tuple[Path, int]]] = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if class_dir.name.startswith("."):
            continue
        if class_dir.name not in index:
            raise DataError(
                f"{split_dir}: class folder {class_dir.name!r} is not one of the checkpoint's "
                f"classes {list(classes)}"
            )
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        per_class.append([(p, index[class_dir.name]) for p in files])
    items = [
        item for group in itertools.zip_longest(*per_class) for item in group if item is not None
    ]
    if not items:
        raise DataError(f"{split_dir} has no images in class folders")
    return items


def load_split(
    split_dir: Path,
    classes: Sequence[str],
    *,
    input_size: Sequence[int],
    resize_size: int,
    limit: int | None = None,
) -> ImageSet:
    """Load and preprocess up to ``limit`` images of a split (all of them when ``None``)."""
    items = list_split(split_dir, classes)
    if limit is not None:
        items = items[:limit]
    images = [preprocess(path, input_size=input_size, resize_size=resize_size) for path, _ in items]
    labels = np.array([label for _, label in items], dtype=np.int64)
    return ImageSet(images=np.stack(images), labels=labels)


def preprocess(path: Path, *, input_size: Sequence[int], resize_size: int) -> np.ndarray:
    """One image as the serving graph takes it: ``[H, W, 3]`` uint8 RGB.

    Decoded as training decodes (``trainer.image_decode``: upright, the one RGB conversion,
    within the pixel budget) and resized with Pillow, as the server resizes.

    Raises:
        DataError: the file cannot be decoded.
    """
    try:
        rgb = open_rgb(path)
    except CorruptImage as error:
        raise DataError(f"cannot decode image {error}") from error
    # The budget bounds the aspect ratio, so this resize cannot blow a sliver up to gigabytes.
    resized = tvf.resize(rgb, [resize_size], antialias=True)
    cropped = tvf.center_crop(resized, [int(input_size[0]), int(input_size[1])])
    return np.asarray(cropped, dtype=np.uint8).copy()
