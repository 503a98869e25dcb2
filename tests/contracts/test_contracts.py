"""The shared contracts: each rule once, the same answer for both halves."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contracts.atomic_files import atomic_write_bytes, atomic_write_text
from contracts.image_formats import (
    IMAGE_EXTENSIONS,
    SUPPORTED_FORMATS,
    has_image_extension,
    to_rgb8,
)
from contracts.preprocessing import InvalidPreprocessing, Preprocessing
from contracts.repository_layout import (
    InvalidModelName,
    is_version_name,
    validate_model_name,
    version_numbers,
)
from contracts.settings import is_unset, parse_bool, parse_int


@pytest.mark.parametrize("name", ["resnet", "a", "model-1.v2_b", "0abc"])
def test_valid_model_names(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize("name", ["", "_x", ".hidden", "a/b", "..", "a b", "é", "x" * 129])
def test_invalid_model_names_name_the_rule(name: str) -> None:
    with pytest.raises(InvalidModelName, match="letters, digits"):
        validate_model_name(name)


def test_version_rule(tmp_path: Path) -> None:
    for name in ("1", "2", "10", "01", "0", "x", ".staging-abc"):
        (tmp_path / name).mkdir()
    (tmp_path / "3").write_text("a file is not a version")
    assert [is_version_name(n) for n in ("1", "10", "01", "0", "-1", "1a")] == [
        True, True, False, False, False, False,
    ]  # fmt: skip
    assert version_numbers(tmp_path) == [1, 2, 10]
    assert version_numbers(tmp_path / "missing") == []


def test_preprocessing_round_trip_and_validation() -> None:
    pre = Preprocessing((32, 40), 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert Preprocessing.from_dict({"input_size": [8, 8]}).resize_size == 8
    for bad, word in (
        ({"input_size": [0, 8]}, "height"),
        ({"input_size": [8]}, "input_size"),
        ({"input_size": [8, 8], "resize_size": 4}, "smaller than the crop"),
        ({"input_size": [8, 8], "mean": [1, 2]}, "mean"),
        ({"input_size": [8, 8], "std": [1, 0, 1]}, "std"),
        ({"input_size": [8, 8], "resize_size": 10**6}, "resize"),
        ({}, "input_size"),
    ):
        with pytest.raises(InvalidPreprocessing, match=word):
            Preprocessing.from_dict(bad)


def test_setting_words() -> None:
    assert [parse_bool(w) for w in ("on", "YES", "1", "true", True)] == [True] * 5
    assert [parse_bool(w) for w in ("off", "no", "0", "False", False)] == [False] * 5
    with pytest.raises(ValueError, match="on/off"):
        parse_bool("maybe")
    assert all(is_unset(w) for w in (None, "", "none", "NULL", " null "))
    assert not is_unset("0")
    assert parse_int(3.0) == 3
    for bad in (True, 2.5, "x"):
        with pytest.raises(ValueError):
            parse_int(bad)


def test_atomic_write_replaces_whole_file_readable_by_others(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"x" * (3 << 20))
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_atomic_write_failure_leaves_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_extensions_come_from_the_format_list() -> None:
    assert set(SUPPORTED_FORMATS) == {"JPEG", "PNG", "WEBP", "BMP"}
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp"} == IMAGE_EXTENSIONS
    assert has_image_extension("A.JPG") and not has_image_extension("a.tif")
    assert not has_image_extension("jpg")


def _round_trip(image: Image.Image, fmt: str) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)
    decoded = _round_trip(Image.fromarray(ramp), "PNG")
    assert decoded.mode in ("I", "I;16")
    rgb = np.asarray(to_rgb8(decoded))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert 0 < rgb.max() < 255


def test_modes_convert_to_rgb() -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    palette.info["transparency"] = 0
    for image, expected in (
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("RGBA", (4, 4), (1, 2, 3, 0)), (1, 2, 3)),
        (_round_trip(palette, "PNG"), (200, 10, 20)),
    ):
        rgb = to_rgb8(image)
        assert rgb.mode == "RGB"
        assert rgb.getpixel((0, 0)) == expected


def test_exif_orientation_is_applied() -> None:
    wide = Image.new("RGB", (6, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    wide.save(buffer, format="JPEG", exif=exif)
    assert to_rgb8(Image.open(io.BytesIO(buffer.getvalue()))).size == (2, 6)
