"""Image decoding and resizing per the model's metadata."""

from __future__ import annotations

import io

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
    np.testing.assert_array_equal(got, resized[1:17, 7:23])
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


@pytest.mark.parametrize(
    ("data", "limits", "message"),
    [
        (b"", LIMITS, "images[3] is empty"),
        (b"GIF89a garbage", LIMITS, "images[3]"),
        (_png(np.zeros((40, 40, 3), np.uint8))[:60], LIMITS, "images[3]"),
        (_png(np.zeros((40, 40, 3), np.uint8)), ImageLimits(50, 1 << 20), "limit is 50"),
        (_png(np.zeros((40, 40, 3), np.uint8)), ImageLimits(1 << 20, 1000), "40x40 pixels"),
    ],
)
def test_bad_images_name_their_index(data: bytes, limits: ImageLimits, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_image(data, 3, SPEC, "uint8-nhwc", limits)
