"""to_rgb8's wide modes (narrowed in bands of rows, with the float formula's results) and its
EXIF step (upright images are not copied)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from contracts.image_formats import to_rgb8

# Wider than one band of ~1 M pixels, so the bands' seams are covered.
SIZE = (1500, 800)


def _reference(values: np.ndarray, scale: float) -> np.ndarray:
    """The float64 conversion to_rgb8 used to run on the whole image."""
    return np.clip(np.rint(values.astype(np.float64) / scale), 0, 255).astype(np.uint8)


def _ramp(low: int, high: int) -> np.ndarray:
    count = SIZE[0] * SIZE[1]
    return np.linspace(low, high, count).astype(np.int64).reshape(SIZE[1], SIZE[0])


@pytest.mark.parametrize(
    ("mode", "values", "scale"),
    [
        ("I;16", _ramp(0, 65535).astype(np.uint16), 257.0),
        ("I;16B", _ramp(0, 65535).astype(">u2"), 257.0),
        ("I", _ramp(-70_000, 2**31 - 1).astype(np.int32), 257.0),
        ("F", np.linspace(-20.0, 300.0, SIZE[0] * SIZE[1], dtype=np.float32).reshape(800, 1500), 1),
    ],
)
def test_wide_modes_match_the_float_conversion(mode: str, values: np.ndarray, scale: float) -> None:
    source = Image.frombytes(mode, SIZE, values.tobytes())
    rgb = to_rgb8(source)
    assert rgb.mode == "RGB" and rgb.size == SIZE
    pixels = np.asarray(rgb)
    np.testing.assert_array_equal(pixels[..., 0], _reference(values, scale))
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    with pytest.raises(ValueError, match="closed image"):
        source.getpixel((0, 0))  # consumed: its pixels were released once narrowed


def test_sixteen_bit_png_turned_by_exif() -> None:
    values = _ramp(0, 65535).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG", exif=exif.tobytes())
    rgb = to_rgb8(Image.open(io.BytesIO(buffer.getvalue())))
    assert rgb.size == (SIZE[1], SIZE[0])
    expected = np.rot90(_reference(values, 257.0), k=-1)
    np.testing.assert_array_equal(np.asarray(rgb)[..., 1], expected)


@pytest.mark.parametrize("orientation", [None, 1])
def test_upright_rgb_is_not_copied(orientation: int | None) -> None:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buffer, "JPEG", exif=exif.tobytes())
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert to_rgb8(image) is image
