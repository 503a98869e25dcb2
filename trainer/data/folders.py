"""The image folder: scan, split, decode, cache, and the datasets the loaders read.

Layout: ``DATA/train/<class>/*`` and optionally ``DATA/val/<class>/*``; without ``val/`` a
seeded stratified share of each class is held out.
Images are decoded by ``trainer.data.image_decode`` (the supported formats only, EXIF orientation
applied, a pixel and aspect budget checked from the header); files that fail it, and files of
other formats, are skipped with their names in the log, or fatal with ``strict``. Structural
problems (missing folder, fewer than two classes, an empty class, val classes that differ from
train) are ``DataError``s raised before any training.

When the decoded dataset fits in ``cache_max_mb`` it is decoded once, shrunk to the eval resize
size, and kept as uint8 tensors in memory: each epoch then costs only the augmentation. The
validation set is also pre-cropped once. Larger datasets are decoded per item in DataLoader
workers.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms.v2 import functional as tvf

from contracts.image_formats import IMAGE_EXTENSIONS
from trainer.data.image_decode import CorruptImage, decode_image
from trainer.errors import DataError

log = logging.getLogger(__name__)

# Bytes per cached pixel (RGB uint8) and the aspect slack of non-square images.
_CACHE_BYTES_PER_PIXEL = 3 * 1.4


@dataclass(frozen=True)
class Sample:
    """One image file and its class index."""

    path: Path
    label: int


@dataclass(frozen=True)
class DatasetSplit:
    """Classes (output order), train and val samples, and the dataset fingerprint."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    fingerprint: dict[str, Any]


def scan_dataset(
    root: Path, *, val_fraction: float, seed: int, strict: bool = False
) -> DatasetSplit:
    """List the image files of ``root`` and split them into train and val.

    Files of other formats (``.tif``, ``.gif``, ...) are skipped and logged like unreadable
    images (``strict``: ``DataError``): the server refuses them, so training on them would
    teach the model what it can never be asked.

    Raises:
        DataError: missing folders, fewer than two classes, an empty class, val classes that
            differ from train, or a class too small to split.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data: {root} does not exist or is not a directory")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"data: {root} has no train/ folder (expected {root}/train/<class>/*)")
    unsupported: list[str] = []
    classes, train = scan_class_folders(train_dir, unsupported)
    val_dir = root / "val"
    if val_dir.is_dir():
        val_classes, val = scan_class_folders(val_dir, unsupported)
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            raise DataError(
                f"data: val classes differ from train classes (only in train: {only_train}, "
                f"only in val: {only_val})"
            )
    else:
        train, val = stratified_split(train, len(classes), val_fraction, seed, classes)
        log.info(
            "no val/ folder: held out %d of %d images for validation",
            len(val),
            len(train) + len(val),
        )
    report_corrupt([f"{path}: not a supported image format" for path in unsupported], strict)
    return DatasetSplit(classes, train, val, dataset_fingerprint(root, classes, [*train, *val]))


def dataset_fingerprint(root: Path, classes: list[str], samples: list[Sample]) -> dict[str, Any]:
    """What identifies a dataset across runs: its classes, file list and file sizes.

    Paths are relative to ``root``, so a moved folder keeps its fingerprint; a file added,
    removed, renamed or rewritten at another size changes it. Sizes come from ``stat`` (no
    reads), so the fingerprint costs one system call per file.
    """
    files = sorted((s.path.relative_to(root).as_posix(), s.path.stat().st_size) for s in samples)
    return {
        "classes": list(classes),
        "file_count": len(files),
        "sha256": hashlib.sha256("\n".join(name for name, _ in files).encode()).hexdigest(),
        "sizes_sha256": hashlib.sha256(
            "\n".join(f"{name}\t{size}" for name, size in files).encode()
        ).hexdigest(),
    }


def fingerprint_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fingerprint keys that differ (only keys both carry: older checkpoints lack some)."""
    return sorted(key for key in recorded.keys() & current.keys() if recorded[key] != current[key])


def scan_class_folders(split_dir: Path, unsupported: list[str]) -> tuple[list[str], list[Sample]]:
    classes = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if len(classes) < 2:
        raise DataError(
            f"data: {split_dir} has {len(classes)} class folder(s) {classes}; at least 2 are needed"
        )
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (split_dir / name).rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        files = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
        unsupported += [str(p) for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not files:
            raise DataError(
                f"data: class {name!r} in {split_dir} has no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        samples += [Sample(p, label) for p in files]
    return classes, samples


def stratified_split(
    samples: Sequence[Sample], num_classes: int, fraction: float, seed: int, classes: list[str]
) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of each class (at least one image, leaving at least one)."""
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in range(num_classes):
        members = [s for s in samples if s.label == label]
        if len(members) < 2:
            raise DataError(
                f"data: class {classes[label]!r} has {len(members)} image; at least 2 are needed "
                "to hold one out for validation (or add a val/ folder)"
            )
        rng.shuffle(members)
        n_val = min(len(members) - 1, max(1, round(len(members) * fraction)))
        val += members[:n_val]
        train += members[n_val:]
    return train, val


def should_cache(num_images: int, resize_size: int, cache_max_mb: int) -> bool:
    """Whether the whole dataset, shrunk to ``resize_size``, fits in the cache budget."""
    estimate = num_images * resize_size * resize_size * _CACHE_BYTES_PER_PIXEL
    return estimate <= cache_max_mb * 2**20


def decode_all(
    samples: Sequence[Sample], *, shorter_side: int, strict: bool, threads: int
) -> tuple[list[torch.Tensor], list[int]]:
    """Decode every sample once, shrunk so its shorter side is ``shorter_side``.

    Returns the tensors and labels of the readable images; unreadable ones are logged by name
    and skipped (``strict``: ``DataError``).
    """

    def load(sample: Sample) -> torch.Tensor | CorruptImage:
        try:
            image = decode_image(sample.path)
        except CorruptImage as exc:
            return exc
        if min(image.shape[-2:]) > shorter_side:
            image = tvf.resize(image, [shorter_side], antialias=True)
        return image

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(load, samples))
    bad = [str(r) for r in results if isinstance(r, CorruptImage)]
    report_corrupt(bad, strict)
    images = [r for r in results if isinstance(r, torch.Tensor)]
    labels = [s.label for s, r in zip(samples, results, strict=True) if isinstance(r, torch.Tensor)]
    return images, labels


def report_corrupt(bad: list[str], strict: bool) -> None:
    """Log the unreadable files (or fail on them with ``strict``)."""
    if not bad:
        return
    if strict:
        raise DataError(
            f"data: {len(bad)} unreadable image(s) (strict_data is on): " + "; ".join(bad)
        )
    log.warning("skipped %d unreadable image(s): %s", len(bad), "; ".join(bad))


def check_classes_present(labels: Sequence[int], classes: list[str], split: str) -> None:
    """After skipping unreadable files every class must still have an image."""
    present = set(labels)
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        raise DataError(f"data: no readable {split} images left for class(es) {empty}")


Transform = Callable[[torch.Tensor], torch.Tensor]


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation: a pure function of (seed, epoch, index).

    Makes augmentation independent of worker count and of where a resumed run restarts.
    """
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2**63)


class CachedTrainSet(Dataset[tuple[torch.Tensor, int]]):
    """Decoded uint8 images in memory; items are ``(index, epoch)`` keys from ``EpochSampler``."""

    def __init__(
        self, images: list[torch.Tensor], labels: list[int], transform: Transform, seed: int
    ) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(self.seed, epoch, index))
            image = self.transform(self.images[index])
        return image, self.labels[index]


class FileTrainSet(Dataset[tuple[torch.Tensor, int]]):
    """Decodes each file when read (datasets too large to cache); same keys as the cache."""

    def __init__(
        self, samples: list[Sample], transform: Transform, seed: int, strict: bool
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.strict = strict

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        index, epoch = key
        for offset in range(len(self.samples)):
            sample = self.samples[(index + offset) % len(self.samples)]
            try:
                image = decode_image(sample.path)
            except CorruptImage as exc:
                if self.strict:
                    raise DataError(f"data: unreadable image (strict_data is on): {exc}") from exc
                # Workers cannot report a count back; each skip is logged where it happens.
                log.warning("skipped unreadable image %s", exc)
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(augmentation_seed(self.seed, epoch, index))
                return self.transform(image), sample.label
        raise DataError("data: no readable training image")


class FileEvalSet(Dataset[tuple[torch.Tensor, int]]):
    """Eval images decoded per item (large datasets); unreadable ones become ``None``."""

    def __init__(self, samples: list[Sample], transform: Transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:  # type: ignore[override]
        sample = self.samples[index]
        try:
            return self.transform(decode_image(sample.path)), sample.label
        except CorruptImage as exc:
            log.warning("skipped unreadable image %s", exc)
            return None


def collate_skipping_none(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) pairs, leaving out unreadable items."""
    items = [b for b in batch if b is not None]
    if not items:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    images = torch.stack([i for i, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return images, labels


class EpochSampler(DistributedSampler[int]):
    """``DistributedSampler`` that yields ``(index, epoch)`` keys and can start mid-epoch.

    The epoch's order depends only on (seed, epoch), so a resumed run skips the batches it
    already trained on (``set_start``) and sees the rest in the same order.
    """

    def __init__(self, size: int, *, num_replicas: int, rank: int, seed: int, drop_last: bool):
        super().__init__(
            range(size),  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0

    def set_start(self, samples: int) -> None:
        """Skip the first ``samples`` of this rank's share of the current epoch."""
        self.start = samples

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.start :]
        return iter([(int(i), self.epoch) for i in indices])

    def __len__(self) -> int:
        return super().__len__() - self.start


def eval_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Slices of a pre-cropped eval set."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]
