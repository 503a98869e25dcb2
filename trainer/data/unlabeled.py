"""Unlabelled images from where the model is used (``--unlabeled-data DIR``).

Any folder of images: searched recursively, file and folder names ignored, so the server's
capture directory (``CAPTURE_DIR/unlabeled/<label>/*.jpg`` with ``.json`` sidecars) works as
it is; files of other formats (the sidecars) are ignored. Images are decoded by the training
data's decoder with its limits (``trainer.data.image_decode``); those that fail are skipped,
counted and named in the log. A folder that is missing, holds no image file or no decodable
one is a ``DataError`` (exit 2) naming the folder and what was found.

At most ``MAX_UNLABELED_IMAGES`` are used (a seeded sample of the files): AdaBN's statistics
and the feature alignment's batches need a few hundred images, not a capture directory's
every file, and they are kept decoded in memory (shrunk to the eval resize size) for the run.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contracts.image_formats import IMAGE_EXTENSIONS
from trainer.data.folders import Sample, Transform, augmentation_seed, decode_all
from trainer.errors import DataError

log = logging.getLogger(__name__)

MAX_UNLABELED_IMAGES = 1024


@dataclass(frozen=True)
class UnlabeledImages:
    """The decoded images (uint8 ``[3, H, W]``, shorter side at the eval resize size) and
    what the folder held."""

    folder: Path
    images: list[torch.Tensor]
    files_found: int
    skipped: int

    def facts(self) -> dict[str, Any]:
        """Counts for the summary and the checkpoint (never the images or their names)."""
        return {
            "files_found": self.files_found,
            "images_used": len(self.images),
            "skipped_unreadable": self.skipped,
        }

    def eval_crops(self, transform: Transform, batch_size: int) -> list[torch.Tensor]:
        """The images through ``transform`` (the eval crop), in uint8 ``[B, 3, H, W]`` batches."""
        return [
            torch.stack([transform(image) for image in self.images[start : start + batch_size]])
            for start in range(0, len(self.images), batch_size)
        ]


def image_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (recursively) with an image extension, sorted; hidden
    files and folders are left out."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    return sorted(found)


def load_unlabeled_images(
    folder: Path,
    *,
    shorter_side: int,
    seed: int,
    limit: int = MAX_UNLABELED_IMAGES,
    threads: int | None = None,
) -> UnlabeledImages:
    """Decode up to ``limit`` images of ``folder``: a seeded sample, decoded in chunks until
    ``limit`` decoded or the files run out.

    Raises:
        DataError: ``folder`` is missing, holds no image file, or none of them decodes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"unlabeled_data: {folder} does not exist or is not a directory")
    files = image_files(folder)
    if not files:
        raise DataError(
            f"unlabeled_data: {folder} holds 0 image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}, searched recursively)"
        )
    random.Random(seed).shuffle(files)
    images: list[torch.Tensor] = []
    tried = 0
    workers = threads or os.cpu_count() or 1
    while len(images) < limit and tried < len(files):
        chunk = files[tried : tried + (limit - len(images))]
        tried += len(chunk)
        decoded, _ = decode_all(
            [Sample(path, 0) for path in chunk],
            shorter_side=shorter_side,
            strict=False,
            threads=workers,
        )
        images += decoded
    skipped = tried - len(images)
    if not images:
        raise DataError(
            f"unlabeled_data: none of the {len(files)} image files in {folder} could be "
            "decoded (the log names each and why)"
        )
    found = UnlabeledImages(folder, images, len(files), skipped)
    log.info(
        "unlabeled data %s: %d image files, %d used%s%s",
        folder,
        len(files),
        len(images),
        f", {skipped} unreadable skipped" if skipped else "",
        f" (at most {limit}: a seeded sample)" if len(files) - skipped > limit else "",
    )
    return found


class UnlabeledStream:
    """Batches of training crops of the unlabelled images, a pure function of the step.

    Batch ``step`` takes the next ``batch_size`` images of a seeded permutation (a new one
    each pass over the images) and augments image j with the seed ``augmentation_seed(seed,
    step, j)``: a resumed run that continues at step s sees the same batches as the run it
    continues, and nothing draws from the global random number generators.
    """

    def __init__(
        self, images: list[torch.Tensor], transform: Transform, batch_size: int, seed: int
    ) -> None:
        self.images = images
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self._permutation: tuple[int, torch.Tensor] | None = None

    def batch_at(self, step: int) -> torch.Tensor:
        """The uint8 ``[B, 3, H, W]`` crops of step ``step`` (0-based, of the phase)."""
        count = len(self.images)
        crops = []
        for j in range(self.batch_size):
            cycle, position = divmod(step * self.batch_size + j, count)
            index = int(self._order(cycle)[position])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(augmentation_seed(self.seed, step, j))
                crops.append(self.transform(self.images[index]))
        return torch.stack(crops)

    def _order(self, cycle: int) -> torch.Tensor:
        if self._permutation is None or self._permutation[0] != cycle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle)
            self._permutation = (cycle, torch.randperm(len(self.images), generator=generator))
        return self._permutation[1]
