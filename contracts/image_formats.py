"""The image formats the pair accepts, and the one conversion of a decoded image to 8-bit RGB.

The trainer (training and the export's checks), the server and the client use this list and
this conversion, so a file means the same pixels in every half. Formats outside the list are
skipped by the trainer and refused by the server: each decoder is attack surface, and these
four cover what cameras, browsers and the demo data produce.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# Pillow format name -> file extensions.
SUPPORTED_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "BMP": (".bmp",),
}
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    suffix for suffixes in SUPPORTED_FORMATS.values() for suffix in suffixes
)


def has_image_extension(name: str) -> bool:
    """Whether a file name ends in one of the supported extensions (any case)."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def to_rgb8(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB, the same for every mode.

    EXIF orientation is applied (phone photos are stored sideways and shown upright); 16- and
    32-bit integer images are scaled to 8 bits, not clipped; transparency is dropped (as
    torchvision's RGB read mode does); palette, grayscale and CMYK go through Pillow's RGB
    conversion.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        # 16-bit PNGs decode as "I" or "I;16"; both hold 0..65535.
        scaled = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "F":
        pixels = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        # Pillow warns on a direct P -> RGB with transparency; RGBA first is the same pixels.
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image
