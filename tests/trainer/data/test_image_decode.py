"""The trainer's one decode: formats, the pixel and aspect budget (checked before decoding),
the one conversion to upright 8-bit RGB, and how the dataset counts what it skips."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_helpers import make_image_folder

from contracts.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from trainer.data.augment import eval_transform
from trainer.data.folders import scan_dataset
from trainer.data.image_decode import CorruptImage, ImageBudget, decode_image
from trainer.errors import DataError
from trainer.export.images import preprocess


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_sliver_is_refused_from_its_header_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "sliver.png"
    Image.new("RGB", (400_000, 1)).save(path)
    before = _peak_rss_mib()
    with pytest.raises(CorruptImage, match=r"400000x1 pixels, aspect ratio over 32:1"):
        decode_image(path)
    with pytest.raises(DataError, match=r"sliver\.png"):
        preprocess(path, input_size=(32, 32), resize_size=36)  # the export's checks
    assert _peak_rss_mib() - before < 200  # a full decode + resize would be GBs


def test_pixel_budget_is_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(path)
    with pytest.raises(CorruptImage, match=r"300x300 pixels is over the budget of 50000"):
        decode_image(path, ImageBudget(max_pixels=50_000))
    assert decode_image(path).shape == (3, 300, 300)


def test_format_outside_the_list_is_refused_even_with_an_image_extension(tmp_path: Path) -> None:
    path = tmp_path / "really-a-gif.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path, format="GIF")
    with pytest.raises(CorruptImage, match=r"really-a-gif\.png"):
        decode_image(path)


def test_modes_take_the_one_conversion(tmp_path: Path) -> None:
    grey16 = np.full((8, 8), 65535, dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "white16.png")
    assert decode_image(tmp_path / "white16.png").min() == 255  # scaled, not clipped to grey
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert decode_image(tmp_path / "cmyk.jpg").min() >= 250
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    assert decode_image(tmp_path / "turned.jpg").shape == (3, 40, 20)  # upright: 20 wide
    pre = Preprocessing((16, 16), 18, IMAGENET_MEAN, IMAGENET_STD)
    assert eval_transform(pre)(decode_image(tmp_path / "turned.jpg")).shape == (3, 16, 16)


def test_unsupported_files_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_image_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(root / "train" / "square" / "scan.tif")
    Image.new("RGB", (8, 8)).save(root / "train" / "circle" / "anim.gif")
    with caplog.at_level(logging.WARNING):
        split = scan_dataset(root, val_fraction=0.25, seed=0)
    assert "skipped 2 unreadable image(s)" in caplog.text
    assert "scan.tif: not a supported image format" in caplog.text
    assert all(s.path.suffix != ".tif" for s in [*split.train, *split.val])
    with pytest.raises(DataError, match=r"anim\.gif: not a supported image format"):
        scan_dataset(root, val_fraction=0.25, seed=0, strict=True)


def test_tensor_holds_every_band_of_the_decoded_pixels(tmp_path: Path) -> None:
    # Over one read-out band (~1 M pixels), so the seams between bands are covered.
    pixels = np.random.default_rng(0).integers(0, 256, (800, 1500, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png", compress_level=1)
    tensor = decode_image(tmp_path / "noise.png")
    assert tensor.dtype == torch.uint8 and tensor.is_contiguous()
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), pixels)
