"""Image decoding and resizing for the classification service, with Pillow (no torch).

The steps mirror torchvision's eval preset that the trainer used: EXIF orientation, RGB,
resize the shorter side to ``resize_size`` (bilinear, antialiased), centre crop to
``input_size``. The model's export metadata supplies those numbers. Decoding runs in a worker
pool so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np
from PIL import Image, UnidentifiedImageError

from contracts.image_formats import to_rgb8
from contracts.preprocessing import Preprocessing
from server.errors import InvalidInput


class ImageLimits:
    """Bounds on what a client may make the server decode (decompression bombs)."""

    def __init__(self, max_bytes: int, max_pixels: int) -> None:
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels


def _resize_and_crop(image: Image.Image, spec: Preprocessing) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short = spec.resize_size
    new_long = int(new_short * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    crop_h, crop_w = spec.input_size
    width, height = image.size
    if crop_w > width or crop_h > height:
        # torchvision pads in this case; a resize_size below the crop is a broken export.
        raise InvalidInput(f"image is smaller than the crop {spec.input_size} after resizing")
    top = round((height - crop_h) / 2.0)
    left = round((width - crop_w) / 2.0)
    return image.crop((left, top, left + crop_w, top + crop_h))


def decode_image(
    data: bytes, index: int, spec: Preprocessing, input_format: str, limits: ImageLimits
) -> np.ndarray:
    """Decode one encoded image into the model's input layout (without the batch axis).

    ``input_format`` is the export metadata's: ``uint8-nhwc`` pixels, or ``float32-nchw``
    normalised by the spec's mean and std.

    Raises:
        InvalidInput: naming ``images[index]``, for empty, oversized or undecodable bytes.
    """
    where = f"images[{index}]"
    if not data:
        raise InvalidInput(f"{where} is empty")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"{where} is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            width, height = opened.size  # from the header; nothing decoded yet
            if width * height > limits.max_pixels:
                raise InvalidInput(
                    f"{where} is {width}x{height} pixels; the limit is {limits.max_pixels}"
                )
            image = to_rgb8(opened)
    except InvalidInput:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(f"{where} is not a decodable JPEG, PNG or WebP image") from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError):
        # Pillow reports truncated and malformed files with any of these.
        raise InvalidInput(f"{where} could not be decoded (corrupt or truncated)") from None
    if min(image.size) < 1:
        raise InvalidInput(f"{where} has no pixels")
    pixels = np.asarray(_resize_and_crop(image, spec), dtype=np.uint8)
    if input_format == "float32-nchw":
        scaled = pixels.astype(np.float32) / 255.0
        normalised = (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))
    return pixels


async def decode_images(
    images: Sequence[bytes],
    spec: Preprocessing,
    input_format: str,
    limits: ImageLimits,
    executor: Executor,
) -> np.ndarray:
    """Decode every image in the worker pool and stack them into one batch."""
    loop = asyncio.get_running_loop()
    arrays = await asyncio.gather(
        *(
            loop.run_in_executor(executor, decode_image, data, index, spec, input_format, limits)
            for index, data in enumerate(images)
        )
    )
    return np.stack(arrays)
