"""Image decoding and resizing per the model's metadata."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from contracts.preprocessing import Preprocessing
from server.errors import InvalidInput
from server.preprocess import ImageLimits, decode_image

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


SPEC = Preprocessing((16, 16), 18, MEAN, STD)


def test_resize_shorter_side_then_centre_crop() -> None:
    array = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    got = decode_image(_png(array), 0, SPEC, "uint8-nhwc", LIMITS)
    # Shorter side 30 -> 18, longer 50 -> int(18 * 50 / 30) = 30; crop 16x16 from 18x30.
    resized = np.asarray(Image.fromarray(array).resize((30, 18), Image.Resampling.BILINEAR))
    # Only the crop is resampled (from source coordinates): the same up to rounding.
    assert np.abs(got.astype(int) - resized[1:17, 7:23]).max() <= 1
    assert got.dtype == np.uint8


def test_float32_nchw_is_normalised() -> None:
    array = np.full((18, 18, 3), 255, dtype=np.uint8)
    got = decode_image(_png(array), 0, SPEC, "float32-nchw", LIMITS)
    assert got.shape == (3, 16, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 0, 0], [(1 - m) / s for m, s in zip(MEAN, STD, strict=True)])


def test_grayscale_and_alpha_become_rgb() -> None:
    for mode in ("L", "RGBA", "P"):
        image = Image.new(mode, (20, 20))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        assert decode_image(buffer.getvalue(), 0, SPEC, "uint8-nhwc", LIMITS).shape == (16, 16, 3)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels: signature, IHDR and an empty IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "limits", "message"),
    [
        (b"", LIMITS, "images[3] is empty"),
        (b"GIF89a garbage", LIMITS, "images[3]"),
        (_png(np.zeros((40, 40, 3), np.uint8))[:60], LIMITS, "images[3]"),
        (_png(np.zeros((40, 40, 3), np.uint8)), ImageLimits(50, 1 << 20), "limit is 50"),
        (
            _png(np.zeros((40, 40, 3), np.uint8)),
            ImageLimits(1 << 20, 1000),
            "40x40 pixels; the limit (max_image_pixels) is 1000",
        ),
        # Past Pillow's own bomb limit (2 x 89 MP) the open itself refuses: still named.
        (_png_header(20000, 20000), LIMITS, "the limit (max_image_pixels) of 1048576"),
    ],
)
def test_bad_images_name_their_index(data: bytes, limits: ImageLimits, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode_image(data, 3, SPEC, "uint8-nhwc", limits)


def _encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(1, 400_000), (400_000, 1), (3, 200), (200, 3)])
def test_slivers_are_refused_before_decoding(size: tuple[int, int]) -> None:
    data = _encoded(Image.new("L", size), "PNG")
    limits = ImageLimits(1 << 20, 1 << 30, max_aspect=32)
    with pytest.raises(InvalidInput, match=r"images\[0\] .*max_image_aspect"):
        decode_image(data, 0, SPEC, "uint8-nhwc", limits)


def test_thin_images_within_the_aspect_bound_decode() -> None:
    for size in ((1, 30), (30, 1), (2, 64)):
        data = _encoded(Image.new("RGB", size, (10, 20, 30)), "PNG")
        got = decode_image(data, 0, SPEC, "uint8-nhwc", ImageLimits(1 << 20, 1 << 20, 32))
        assert got.shape == (16, 16, 3)


def test_resize_target_over_the_pixel_limit_is_refused() -> None:
    big = Preprocessing((16, 16), 1000, MEAN, STD)
    data = _encoded(Image.new("RGB", (20, 40)), "PNG")
    with pytest.raises(InvalidInput, match=r"resized to 1000x2000 .*max_image_pixels"):
        decode_image(data, 0, big, "uint8-nhwc", ImageLimits(1 << 20, 1 << 20))


@pytest.mark.parametrize(
    ("fmt", "name"), [("GIF", "GIF"), ("TIFF", "TIFF"), ("ICO", "ICO"), ("PPM", "PPM")]
)
def test_unsupported_formats_are_named(fmt: str, name: str) -> None:
    data = _encoded(Image.new("RGB", (20, 20)), fmt)
    with pytest.raises(InvalidInput, match=rf"images\[2\] is {name}, .*JPEG, PNG, WEBP, BMP"):
        decode_image(data, 2, SPEC, "uint8-nhwc", LIMITS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_supported_formats_decode(fmt: str) -> None:
    data = _encoded(Image.new("RGB", (24, 20), (200, 100, 50)), fmt)
    got = decode_image(data, 0, SPEC, "uint8-nhwc", LIMITS)
    assert got.shape == (16, 16, 3)
    assert np.abs(got.astype(int) - [200, 100, 50]).max() <= 8


def test_cmyk_and_16_bit_images_decode() -> None:
    cmyk = _encoded(Image.new("CMYK", (20, 20), (0, 0, 0, 0)), "JPEG")
    assert decode_image(cmyk, 0, SPEC, "uint8-nhwc", LIMITS).min() >= 250
    wide = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    assert decode_image(_encoded(wide, "PNG"), 0, SPEC, "uint8-nhwc", LIMITS).min() == 255


def test_large_jpeg_decodes_at_reduced_scale_close_to_full() -> None:
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((64, 64, 1))).astype(np.uint8)
    data = _encoded(Image.fromarray(smooth), "JPEG", quality=95)
    limits = ImageLimits(1 << 24, 1 << 24)
    got = decode_image(data, 0, SPEC, "uint8-nhwc", limits)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((18, 18), Image.Resampling.BILINEAR)
    reference = np.asarray(full)[1:17, 1:17].astype(int)
    assert got.shape == (16, 16, 3)
    assert np.abs(got.astype(int) - reference).mean() < 4


def test_exif_rotated_sliver_is_judged_upright() -> None:
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90: decoded 20 wide, 60 high
    data = _encoded(image, "JPEG", exif=exif.tobytes())
    assert decode_image(data, 0, SPEC, "uint8-nhwc", LIMITS).shape == (16, 16, 3)
    with pytest.raises(InvalidInput, match="20x60 pixels, an aspect ratio of 3:1"):
        decode_image(data, 0, SPEC, "uint8-nhwc", ImageLimits(1 << 20, 1 << 20, 2))
