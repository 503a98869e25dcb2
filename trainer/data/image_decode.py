"""How the trainer reads an image file: one list of formats, one conversion, one budget.

Training, evaluation and the export's checks all decode through ``open_rgb``: the file's
structure checked as the server checks it (``contracts.image_header.open_image``: no JPEG of
more than 32 scans, no RLE BMP, Pillow restricted to ``SUPPORTED_FORMATS``), the size checked
from the header before any pixel is decoded, then ``to_rgb8`` (EXIF orientation applied,
16-bit scaled, CMYK, palette and transparency converted), the same conversion the server
applies. A file that fails any of it is a ``CorruptImage``: skipped and counted, or fatal with
``strict_data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from contracts.image_formats import to_rgb8
from contracts.image_header import UnsafeImage, open_image

#: Largest image (width x height) decoded: 50 MP covers phone and DSLR photos; beyond it a
#: file is a scan, a panorama or a decompression bomb, and one of them can exhaust a worker.
MAX_PIXELS = 50_000_000
#: Largest ratio of the longer to the shorter side. Thinner images resize to slivers whose
#: long side is ``resize_size`` times this ratio, and teach the model nothing.
MAX_ASPECT = 32.0

# Pixels read out of a decoded image at a time (a few MB of temporaries).
_READOUT_PIXELS = 1 << 20


class CorruptImage(Exception):  # noqa: N818 - reads as the condition it reports
    """A file the trainer will not use: undecodable, of another format, or over budget."""


@dataclass(frozen=True)
class ImageBudget:
    """What decoding one file may cost, checked from its header before decoding."""

    max_pixels: int = MAX_PIXELS
    max_aspect: float = MAX_ASPECT

    def check(self, size: tuple[int, int], where: str) -> None:
        """Raise ``CorruptImage`` naming the limit when ``size`` (width, height) is over it."""
        width, height = size
        if width < 1 or height < 1:
            raise CorruptImage(f"{where}: has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise CorruptImage(
                f"{where}: {width}x{height} pixels is over the budget of {self.max_pixels}"
            )
        if max(width, height) > self.max_aspect * min(width, height):
            raise CorruptImage(
                f"{where}: {width}x{height} pixels, aspect ratio over {self.max_aspect:g}:1"
            )


DEFAULT_BUDGET = ImageBudget()


def open_rgb(path: Path, budget: ImageBudget = DEFAULT_BUDGET) -> Image.Image:
    """The upright 8-bit RGB image of a file, within ``budget``.

    Raises:
        CorruptImage: naming the file and why (format outside the list, over budget, or
            undecodable).
    """
    try:
        with open_image(path) as image:
            budget.check(image.size, str(path))
            return to_rgb8(image)
    except CorruptImage:
        raise
    except UnsafeImage as error:
        raise CorruptImage(f"{path}: {error}") from error
    except Exception as error:  # Pillow reports bad files with many unrelated types
        raise CorruptImage(f"{path}: {type(error).__name__}: {error}") from error


def decode_image(path: Path, budget: ImageBudget = DEFAULT_BUDGET) -> torch.Tensor:
    """Decode a file to an upright RGB uint8 tensor ``[3, H, W]`` (see ``open_rgb``)."""
    image = open_rgb(path, budget)
    width, height = image.size
    tensor = torch.empty((3, height, width), dtype=torch.uint8)
    planes = tensor.numpy()
    # Read out a band of rows at a time: np.asarray of the whole image goes through Pillow's
    # tobytes, which holds two full copies at once (a 50 MP image: 2 x 143 MiB).
    rows = max(1, _READOUT_PIXELS // width)
    for top in range(0, height, rows):
        band = np.asarray(image.crop((0, top, width, min(height, top + rows))), dtype=np.uint8)
        planes[:, top : top + band.shape[0]] = band.transpose(2, 0, 1)
    return tensor
