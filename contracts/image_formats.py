"""The image formats the pair accepts, and the one conversion of a decoded image to 8-bit RGB.

The trainer (training and the export's checks), the server and the client use this list and
this conversion, so a file means the same pixels in every half. Formats outside the list are
skipped by the trainer and refused by the server: each decoder is attack surface, and these
four cover what cameras, browsers and the demo data produce.
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image, ImageOps

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


# Modes wider than 8 bits per sample: 16-bit PNGs decode as "I;16" (older Pillow: "I").
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Wide images are narrowed this many pixels at a time: the temporaries stay a few MB, where
# one float64 copy of a 50 MP image is 400 MB.
_BAND_PIXELS = 1 << 20
# EXIF orientations that move pixels (1 is upright).
_TURNED = (2, 3, 4, 5, 6, 7, 8)


def to_rgb8(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB, the same for every mode.

    EXIF orientation is applied (phone photos are stored sideways and shown upright); 16- and
    32-bit integer images are scaled to 8 bits (``round(value / 257)``), not clipped; float
    images are rounded and clipped to 0..255; transparency is dropped (as torchvision's RGB
    read mode does); palette, grayscale and CMYK go through Pillow's RGB conversion.

    ``image`` is consumed: use only the returned image. A wide image's pixels are released
    once narrowed, so a 50 MP 16-bit source and its RGB result are never held together.
    """
    image.load()  # a PNG's EXIF may follow its pixels
    if image.getexif().get(ExifTags.Base.Orientation, 1) in _TURNED:
        image = ImageOps.exif_transpose(image)  # a copy; upright images are not copied
    if image.mode in _WIDE_MODES:
        grey = _narrow(image)
        image.close()
        image = grey
    if image.mode == "P" and "transparency" in image.info:
        # Pillow warns on a direct P -> RGB with transparency; RGBA first is the same pixels.
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _narrow(image: Image.Image) -> Image.Image:
    """An "L" image of a wide one, a band of rows at a time, in integer arithmetic for "I"."""
    width, height = image.size
    rows = max(1, _BAND_PIXELS // width)
    grey = Image.new("L", image.size)
    for top in range(0, height, rows):
        band = np.asarray(image.crop((0, top, width, min(height, top + rows))))
        if image.mode == "F":
            narrow = np.clip(np.rint(band), 0, 255).astype(np.uint8)
        else:
            # round(v / 257) without floats: floor((2v + 257) / 514); v / 257 is never a tie.
            wide = np.clip(band.astype(np.int64), 0, 65535)
            narrow = ((2 * wide + 257) // 514).astype(np.uint8)
        grey.paste(Image.fromarray(narrow), (0, top))
    return grey
