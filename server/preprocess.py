"""Image decoding and resizing for the classification service, with Pillow (no torch).

The steps mirror torchvision's eval preset that the trainer used: EXIF orientation, RGB,
resize the shorter side to ``resize_size`` (bilinear, antialiased), centre crop to
``input_size``. The model's export metadata supplies those numbers.

Every image is planned before it is decoded: the header gives the size, from which the resize
target and the crop are computed; images too large, too thin, in a format outside
``contracts.image_formats.SUPPORTED_FORMATS`` or whose structure would make the decode cost
far more than its pixels (``contracts.image_header``: too many JPEG scans, RLE BMPs) are
refused before any pixel is allocated. The
crop is then mapped back to source coordinates, so only the surviving region is resampled
(a 1 x 400,000 px sliver would otherwise be resized to gigabytes). JPEGs are decoded at a
reduced DCT scale (``Image.draft``) when the image is far larger than the resize target.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageMode, UnidentifiedImageError

from contracts.graph_signature import FLOAT32_NCHW
from contracts.image_formats import SUPPORTED_FORMATS, to_rgb8
from contracts.image_header import UnsafeImage, open_image
from contracts.preprocessing import Preprocessing
from server.errors import InvalidInput

_FORMAT_NAMES = ", ".join(SUPPORTED_FORMATS)
# Leading bytes of formats clients send by mistake, to name them in the refusal.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
    (b"qoif", "QOI"),
    (b"P1", "PPM"),
    (b"P2", "PPM"),
    (b"P3", "PPM"),
    (b"P4", "PPM"),
    (b"P5", "PPM"),
    (b"P6", "PPM"),
)
# Pillow stores every mode of more than one band at 4 bytes a pixel (RGB included).
_MULTIBAND_PIXEL_BYTES = 4
# EXIF orientations that swap width and height.
_TRANSPOSED = (5, 6, 7, 8)
# A JPEG is decoded at 1/2, 1/4 or 1/8 scale only while it stays this many times the resize
# target, so the reduced decode never replaces the antialiased resize that follows it.
_DRAFT_MARGIN = 2


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what a client may make the server decode (decompression bombs, slivers).

    Attributes:
        max_bytes: largest encoded image.
        max_pixels: largest image (width x height, from its header) and largest resize target.
        max_aspect: largest ratio of the longer to the shorter side; the resize target's long
            side is ``resize_size`` times this at most.
    """

    max_bytes: int
    max_pixels: int
    max_aspect: float = 32.0


@dataclass(frozen=True)
class ResizePlan:
    """Where the crop lies: ``box`` in source pixels, resampled to ``crop`` (width, height)."""

    target: tuple[int, int]
    box: tuple[float, float, float, float]
    crop: tuple[int, int]


def _sniff_format(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] != b"WEBP":
        return "RIFF"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    return "an unrecognised format"


def plan_resize(
    size: tuple[int, int], spec: Preprocessing, limits: ImageLimits, where: str
) -> ResizePlan:
    """The resize target and centre crop of an upright ``size`` (width, height), checked.

    Raises:
        InvalidInput: the image is thinner than ``limits.max_aspect``, its resize target is
            over ``limits.max_pixels``, or the crop does not fit (a broken export).
    """
    width, height = size
    short, long = min(width, height), max(width, height)
    if short < 1:
        raise InvalidInput(f"{where} has no pixels")
    if long > limits.max_aspect * short:
        raise InvalidInput(
            f"{where} is {width}x{height} pixels, an aspect ratio of {long / short:.0f}:1; "
            f"the limit (max_image_aspect) is {limits.max_aspect:g}:1"
        )
    new_short = spec.resize_size
    new_long = int(new_short * long / short)
    target = (new_short, new_long) if width <= height else (new_long, new_short)
    if target[0] * target[1] > limits.max_pixels:
        raise InvalidInput(
            f"{where} would be resized to {target[0]}x{target[1]} pixels; the limit "
            f"(max_image_pixels) is {limits.max_pixels}"
        )
    crop_h, crop_w = spec.input_size
    if crop_w > target[0] or crop_h > target[1]:
        # torchvision pads in this case; a resize_size below the crop is a broken export.
        raise InvalidInput(f"image is smaller than the crop {spec.input_size} after resizing")
    top = round((target[1] - crop_h) / 2.0)
    left = round((target[0] - crop_w) / 2.0)
    scale_x, scale_y = width / target[0], height / target[1]
    box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
    return ResizePlan(target, box, (crop_w, crop_h))


def _upright_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    orientation = image.getexif().get(0x0112)
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def _draft_jpeg(image: Image.Image, plan: ResizePlan, transposed: bool) -> None:
    """Let libjpeg decode at a reduced scale that still holds twice the resize target."""
    if image.format != "JPEG":
        return
    width, height = plan.target
    if transposed:
        width, height = height, width
    image.draft(None, (width * _DRAFT_MARGIN, height * _DRAFT_MARGIN))


def _open(data: bytes, where: str, limits: ImageLimits) -> Image.Image:
    if not data:
        raise InvalidInput(f"{where} is empty")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"{where} is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        opened = open_image(data)
    except UnsafeImage as error:
        raise InvalidInput(f"{where} is refused: {error}") from None
    except UnidentifiedImageError:
        raise InvalidInput(
            f"{where} is {_sniff_format(data)}, not a decodable image of a supported format "
            f"({_FORMAT_NAMES})"
        ) from None
    width, height = opened.size  # from the header; nothing decoded yet
    if width * height > limits.max_pixels:
        raise InvalidInput(
            f"{where} is {width}x{height} pixels; the limit (max_image_pixels) is "
            f"{limits.max_pixels}"
        )
    return opened


def _decode_rgb(data: bytes, spec: Preprocessing, limits: ImageLimits, where: str) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        opened = _open(data, where, limits)
        upright = _upright_size(opened)
        plan = plan_resize(upright, spec, limits, where)
        _draft_jpeg(opened, plan, transposed=upright != opened.size)
        image = to_rgb8(opened)
    # The draft may have shrunk the image: map the crop onto what was really decoded.
    plan = plan_resize(image.size, spec, limits, where)
    return image.resize(plan.crop, Image.Resampling.BILINEAR, box=plan.box)


def _pixel_bytes(mode: str) -> int:
    """Bytes Pillow allocates per pixel of ``mode``."""
    described = ImageMode.getmode(mode)
    if len(described.bands) > 1:
        return _MULTIBAND_PIXEL_BYTES
    return max(1, np.dtype(described.typestr).itemsize)


@contextmanager
def _decode_errors(where: str, limits: ImageLimits) -> Iterator[None]:
    """Pillow's many ways of refusing a file, as one InvalidInput naming the image."""
    try:
        yield
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(
            f"{where} has more pixels than the limit (max_image_pixels) of {limits.max_pixels}"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError):
        # Pillow reports truncated and malformed files with any of these.
        raise InvalidInput(f"{where} could not be decoded (corrupt or truncated)") from None
    except (OverflowError, MemoryError, ZeroDivisionError):
        raise InvalidInput(f"{where} has dimensions the decoder cannot handle") from None


def decode_memory(data: bytes, index: int, spec: Preprocessing, limits: ImageLimits) -> int:
    """Bytes the decode of one image will hold, read from its header: nothing is decoded.

    The decoded pixels (at the JPEG draft scale the decode will use) in the mode of the file,
    plus the RGB image made of them, at Pillow's bytes per pixel. The same checks as
    ``decode_image`` run first, so an image it would refuse is refused here, before any
    memory is reserved for it.

    Raises:
        InvalidInput: as ``decode_image``.
    """
    where = f"images[{index}]"
    with _decode_errors(where, limits), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        opened = _open(data, where, limits)
        upright = _upright_size(opened)
        plan = plan_resize(upright, spec, limits, where)
        _draft_jpeg(opened, plan, transposed=upright != opened.size)
        width, height = opened.size  # the draft's, when it shrank the decode
        return width * height * (_pixel_bytes(opened.mode) + _MULTIBAND_PIXEL_BYTES)


def decode_image(
    data: bytes, index: int, spec: Preprocessing, input_format: str, limits: ImageLimits
) -> np.ndarray:
    """Decode one encoded image into the model's input layout (without the batch axis).

    ``input_format`` is the export metadata's: ``uint8-nhwc`` pixels, or ``float32-nchw``
    normalised by the spec's mean and std.

    Raises:
        InvalidInput: naming ``images[index]`` and the limit or format, for empty, oversized,
            too thin, unsupported or undecodable images.
    """
    where = f"images[{index}]"
    with _decode_errors(where, limits):
        cropped = _decode_rgb(data, spec, limits, where)
    pixels = np.asarray(cropped, dtype=np.uint8)
    if input_format == FLOAT32_NCHW:
        scaled = pixels.astype(np.float32) / 255.0
        normalised = (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))
    return pixels
