"""Golden sets for the test repositories, computed by a reference path.

The expected probabilities come from Pillow's full resize of the upright image followed by a
centre crop (the textbook eval transform), run through onnxruntime. The server's own path
(``server.preprocess``, which resamples only the crop's source box) is then checked against it
at every load, as it is against the trainer's numbers in a real export.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from contracts.golden_set import GOLDEN_DIRNAME, GOLDEN_FILENAME, GoldenImage, GoldenSet
from contracts.image_formats import to_rgb8
from contracts.preprocessing import Preprocessing

#: The factory's models see the same pixels through both paths; this covers float rounding.
TOLERANCE = 0.02
EXIF_ORIENTATION = 0x0112


def framed_image(size: tuple[int, int], border: tuple[int, int, int], centre: tuple[int, ...]):
    """An RGB image of one colour with a centre rectangle (half of each side) of another.

    A crop that is too tight or too loose sees a different mean colour, so a wrong
    ``resize_size`` changes what a pooling classifier predicts.
    """
    width, height = size
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = border
    pixels[height // 4 : height - height // 4, width // 4 : width - width // 4] = centre
    return Image.fromarray(pixels)


def golden_images() -> list[tuple[str, bytes]]:
    """A PNG, a JPEG, a non-square WebP and a JPEG stored sideways with an EXIF rotation."""
    files = []
    buffer = io.BytesIO()
    framed_image((48, 48), (200, 30, 30), (20, 40, 220)).save(buffer, "PNG")
    files.append(("00-framed.png", buffer.getvalue()))
    buffer = io.BytesIO()
    framed_image((40, 56), (30, 200, 60), (240, 240, 20)).save(buffer, "JPEG", quality=95)
    files.append(("01-framed.jpg", buffer.getvalue()))
    buffer = io.BytesIO()
    framed_image((64, 40), (10, 10, 10), (250, 120, 0)).save(buffer, "WEBP", lossless=True)
    files.append(("02-framed.webp", buffer.getvalue()))
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored rotated; shown upright after a 90-degree turn
    sideways = framed_image((56, 40), (90, 90, 200), (250, 250, 250))
    sideways.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    files.append(("03-exif-rotated.jpg", buffer.getvalue()))
    return files


def reference_pixels(data: bytes, pre: Preprocessing, input_format: str) -> np.ndarray:
    """Upright RGB, full antialiased bilinear resize of the shorter side, centre crop."""
    with Image.open(io.BytesIO(data)) as opened:
        image = to_rgb8(opened)
    width, height = image.size
    scale = pre.resize_size / min(width, height)
    target = (
        (pre.resize_size, int(height * scale))
        if width <= height
        else (int(width * scale), pre.resize_size)
    )
    resized = image.resize(target, Image.Resampling.BILINEAR)
    crop_h, crop_w = pre.input_size
    left = round((target[0] - crop_w) / 2.0)
    top = round((target[1] - crop_h) / 2.0)
    pixels = np.asarray(resized.crop((left, top, left + crop_w, top + crop_h)), np.uint8)
    if input_format == "float32-nchw":
        scaled = pixels.astype(np.float32) / 255.0
        normalised = (scaled - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))
    return pixels


def write_golden_set(version_dir: Path, model: onnx.ModelProto, document: dict[str, Any]) -> None:
    """Write ``golden/`` into a (staging) version directory for ``model`` and its model.json."""
    pre = Preprocessing.from_dict(document)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    directory = version_dir / GOLDEN_DIRNAME
    directory.mkdir()
    images = []
    for name, data in golden_images():
        (directory / name).write_bytes(data)
        pixels = reference_pixels(data, pre, document["input_format"])
        (probabilities,) = session.run(["probabilities"], {"image": pixels[np.newaxis]})
        row = [float(p) for p in probabilities[0]]
        images.append(GoldenImage(name, int(np.argmax(row)), tuple(row), source="generated"))
    golden = GoldenSet(tuple(document["labels"]), tuple(images), TOLERANCE)
    (directory / GOLDEN_FILENAME).write_text(json.dumps(golden.to_dict(), indent=2))
