"""The holdout set an exported version carries (layout: ``contracts.holdout_set``).

``DATA/holdout/<class>/`` holds reviewed production images a person labelled and the trainer
never used (``trainer ingest --split holdout``): not for training, not for choosing the best
epoch. The export copies them byte for byte into the version, classes interleaved, up to
``MAX_HOLDOUT_IMAGES``, so the server's rollout gate can compare the new version with the one
it would replace where the model is used. Files that are not decodable images within the
training budget, over the byte bound, or in a class folder the model does not have, are left
out and counted (a class folder the model lacks is named in a warning).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from contracts.holdout_set import (
    HOLDOUT_DIRNAME,
    HOLDOUT_FILENAME,
    MAX_HOLDOUT_IMAGE_BYTES,
    MAX_HOLDOUT_IMAGES,
    HoldoutImage,
    HoldoutSet,
)
from contracts.image_formats import has_image_extension
from trainer.data.image_decode import CorruptImage, open_rgb

log = logging.getLogger(__name__)


def build_holdout_set(data_dir: Path, classes: Sequence[str]) -> tuple[dict[str, bytes], dict]:
    """The version's holdout files keyed by their path in the version (none without
    ``DATA/holdout``), and the facts for the export's summary."""
    root = Path(data_dir) / HOLDOUT_DIRNAME
    if not root.is_dir():
        return {}, {"images": 0}
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in folders if name not in classes]
    if unknown:
        log.warning("holdout set: class folders the model does not have, left out: %s", unknown)
    per_class = [_files(root / name) for name in classes]
    chosen: list[tuple[Path, int]] = []
    left_out = 0
    for path, label in _interleaved(per_class):
        if len(chosen) == MAX_HOLDOUT_IMAGES:
            left_out += 1
            continue
        if _usable(path):
            chosen.append((path, label))
        else:
            left_out += 1
    images, files = [], {}
    for index, (path, label) in enumerate(chosen):
        name = f"{index:03d}-{path.name}"
        images.append(HoldoutImage(name, label))
        files[f"{HOLDOUT_DIRNAME}/{name}"] = path.read_bytes()
    if not images:
        return {}, {"images": 0, "left_out": left_out}
    document = json.dumps(HoldoutSet(tuple(classes), tuple(images)).to_dict(), indent=2)
    files[f"{HOLDOUT_DIRNAME}/{HOLDOUT_FILENAME}"] = (document + "\n").encode()
    return files, {"images": len(images), "left_out": left_out}


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and has_image_extension(p.name))


def _interleaved(per_class: list[list[Path]]) -> list[tuple[Path, int]]:
    labelled = [[(path, label) for path in files] for label, files in enumerate(per_class)]
    return [item for group in itertools.zip_longest(*labelled) for item in group if item]


def _usable(path: Path) -> bool:
    try:
        if path.stat().st_size > MAX_HOLDOUT_IMAGE_BYTES:
            return False
        open_rgb(path)
    except (OSError, CorruptImage) as error:
        log.info("holdout set: %s left out: %s", path.name, error)
        return False
    return True
