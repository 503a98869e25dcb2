"""Real images for verification, calibration and accuracy: an ImageFolder split, preprocessed
exactly as the serving graph expects (shorter side resized, centre crop, uint8 RGB NHWC)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.transforms.v2 import functional as tvf

from trainer.data.folders import scan_dataset
from trainer.data.image_decode import CorruptImage, open_rgb
from trainer.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images (``[N, H, W, 3]`` uint8) and their class indices (``[N]`` int64)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SplitRule:
    """How the training run split its data: the seeded share of each class it held out for
    validation when the folder has no ``val/`` (``TrainConfig.val_fraction`` and ``seed``)."""

    val_fraction: float
    seed: int


def list_split(
    data_dir: Path, split: str, classes: Sequence[str], rule: SplitRule
) -> list[tuple[Path, int]]:
    """The run's own ``split`` (``train`` or ``val``) of ``data_dir``, with class indices.

    The split is the one training used (``trainer.data.folders.scan_dataset``): ``DATA/val`` when it
    exists, else the seeded share ``rule`` holds out of ``DATA/train``, so a train-only folder
    exports with real val images. Files are interleaved across classes (one of each class in
    turn), so any prefix of the list covers the classes evenly.

    Raises:
        DataError: the folder is not the checkpoint's data (other classes), or the split is
            missing or empty.
    """
    dataset = scan_dataset(data_dir, val_fraction=rule.val_fraction, seed=rule.seed)
    if list(dataset.classes) != list(classes):
        raise DataError(
            f"data: {data_dir} has the classes {dataset.classes}; the checkpoint was trained "
            f"on {list(classes)}"
        )
    samples = dataset.val if split == "val" else dataset.train
    per_class: list[list[tuple[Path, int]]] = [[] for _ in classes]
    for sample in samples:
        per_class[sample.label].append((sample.path, sample.label))
    items = [
        item for group in itertools.zip_longest(*per_class) for item in group if item is not None
    ]
    if not items:
        raise DataError(f"data: {data_dir} has no {split} images")
    return items


def load_split(
    items: Sequence[tuple[Path, int]],
    *,
    input_size: Sequence[int],
    resize_size: int,
    limit: int | None = None,
) -> ImageSet:
    """Preprocess up to ``limit`` decodable images of ``items`` (all of them when ``None``).

    Files that fail to decode are skipped, named in the log and counted, as training skips
    them: one bad file must not undo a finished run at its export.

    Raises:
        DataError: not one of the files decodes.
    """
    wanted = len(items) if limit is None else limit
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[str] = []
    for path, label in items:
        if len(images) >= wanted:
            break
        try:
            images.append(preprocess(path, input_size=input_size, resize_size=resize_size))
        except DataError as error:
            skipped.append(str(error))
            continue
        labels.append(label)
    if skipped:
        log.warning("skipped %d undecodable image(s): %s", len(skipped), "; ".join(skipped[:5]))
    if not images:
        raise DataError(f"none of the {len(items)} images could be decoded")
    return ImageSet(images=np.stack(images), labels=np.array(labels, dtype=np.int64))


def preprocess(path: Path, *, input_size: Sequence[int], resize_size: int) -> np.ndarray:
    """One image as the serving graph takes it: ``[H, W, 3]`` uint8 RGB.

    Decoded as training decodes (``trainer.data.image_decode``: upright, the one RGB conversion,
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
