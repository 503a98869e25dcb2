"""What an encoded image's structure must promise before any of its pixels is decoded.

The pixel and aspect limits bound the memory of a decode, not its CPU: a 400 KB progressive
JPEG whose last scan repeats 10,000 times costs ~90 s of entropy decoding at any ``draft``
scale, a 6 KB RLE8 BMP costs seconds in Pillow's pure-Python RLE decoder, and a PNG or JPEG
made of millions of tiny chunks or segments costs seconds in Pillow's Python header loops.
``check_header`` walks the raw bytes (markers and chunk headers only: no entropy decoding, no
decompression) and refuses those; ``open_image`` is the one way both halves open an image:
the walk, Pillow restricted to the supported formats, and no tile left to a Python decoder.
"""

from __future__ import annotations

import io
import mmap
import re
import struct
from pathlib import Path

from PIL import Image, ImageFile

from contracts.image_formats import SUPPORTED_FORMATS

#: Scans (SOS markers) in one JPEG. libjpeg's progressive script writes 10 for colour and 18
#: for CMYK, mozjpeg and jpegli about as many. Every scan entropy-decodes the whole image
#: again (a repeated refinement scan costs ~9 ms per 16 MP, measured), so 32 keeps a JPEG
#: within about three times the decode of an ordinary progressive one of its size.
MAX_JPEG_SCANS = 32
#: Marker segments in one JPEG (scans, tables, APPn, COM). A camera JPEG has a few dozen
#: (an ICC profile split into APP2 segments at most 255); Pillow reads each in Python.
MAX_JPEG_SEGMENTS = 1024
#: Bytes outside any segment before the first scan, which Pillow skips one at a time in
#: Python (30 MB of them cost 2 s). Encoders write none; a few are tolerated as libjpeg does.
MAX_JPEG_STRAY_BYTES = 65_536
#: Chunks in one PNG, each read by Pillow in Python (~2.5 us each: 65,536 cost 0.2 s).
#: libpng's default 8 KiB IDAT chunks reach the limit only in a 512 MiB file.
MAX_PNG_CHUNKS = 65_536
#: BMP compressions decoded by Pillow's C unpackers: none (BI_RGB) and BI_BITFIELDS.
BMP_COMPRESSIONS = {0: "none", 3: "bitfields"}

_BMP_COMPRESSION_NAMES = {1: "RLE8", 2: "RLE4", 4: "JPEG", 5: "PNG", 6: "alpha bitfields"}
# A marker: 0xFF and a code that is not a stuffed zero, a restart (RSTn, inside scan data) or
# a fill byte. Found by the regex engine, so scan data is skipped at C speed.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_STANDALONE = frozenset({0x01, 0xD8})  # TEM, SOI: no length field
_FORMATS = tuple(SUPPORTED_FORMATS)

Encoded = bytes | mmap.mmap


class UnsafeImage(ValueError):  # noqa: N818 - reads as the condition it reports
    """An image whose structure would make decoding it cost far more than its pixels.

    The message is a noun phrase naming the problem and the limit ("a JPEG of more than 32
    scans ..."), for the server's and the trainer's invalid-input errors to wrap.
    """


def check_header(data: Encoded) -> None:
    """Refuse a JPEG, PNG or BMP whose structure would make its decode expensive.

    Only the markers, chunk headers and BMP header fields are read, so the check costs
    microseconds for an ordinary file and at most a few tens of milliseconds for a hostile
    one. Truncated or malformed data that the walk cannot follow passes: Pillow refuses it.

    Raises:
        UnsafeImage: too many JPEG scans, segments or stray bytes, too many PNG chunks, or a
            BMP compression other than none or bitfields.
    """
    if data[:2] == b"\xff\xd8":
        _check_jpeg(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png(data)
    elif data[:2] == b"BM":
        _check_bmp(data)


def _check_jpeg(data: Encoded) -> None:
    scans = segments = stray = 0
    position = 2
    while (found := _JPEG_MARKER.search(data, position)) is not None:
        if not scans:
            stray += found.start() - position
            if stray > MAX_JPEG_STRAY_BYTES:
                raise UnsafeImage(
                    f"a JPEG with more than {MAX_JPEG_STRAY_BYTES} stray bytes between its "
                    "header segments"
                )
        code = data[found.start() + 1]
        if code == _JPEG_EOI:
            return
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise UnsafeImage(f"a JPEG of more than {MAX_JPEG_SEGMENTS} marker segments")
        if code == _JPEG_SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise UnsafeImage(
                    f"a JPEG of more than {MAX_JPEG_SCANS} scans (each decodes the whole image "
                    "again; a progressive JPEG has about 10)"
                )
        position = found.end()
        if code not in _JPEG_STANDALONE:
            if position + 2 > len(data):
                return
            # The scan data after an SOS header is skipped by the next search.
            position += (data[position] << 8) | data[position + 1]


def _check_png(data: Encoded) -> None:
    position, chunks = 8, 0
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise UnsafeImage(f"a PNG of more than {MAX_PNG_CHUNKS} chunks")
        if kind == b"IEND":
            return
        position += 12 + length  # length, type, data, CRC


def _check_bmp(data: Encoded) -> None:
    if len(data) < 34:
        return
    header_size = int.from_bytes(data[14:18], "little")
    if header_size == 12:  # the OS/2 core header has no compression field: uncompressed
        return
    compression = int.from_bytes(data[30:34], "little")
    if compression not in BMP_COMPRESSIONS:
        name = _BMP_COMPRESSION_NAMES.get(compression, f"unknown ({compression})")
        why = " (Pillow decodes RLE in Python: a few KB cost seconds)" if "RLE" in name else ""
        raise UnsafeImage(
            f"a BMP with {name} compression; only uncompressed and bitfields BMPs are accepted{why}"
        )


def check_decoders(image: ImageFile.ImageFile) -> None:
    """Refuse an opened image whose pixels Pillow would decode in Python.

    Pillow's C decoders release the GIL and run at C speed; those registered from Python
    (RLE BMP, and any a future plugin adds) hold the GIL for the whole decode.

    Raises:
        UnsafeImage: naming the format and the decoder.
    """
    python = sorted({tile.codec_name for tile in image.tile} & set(Image.DECODERS))
    if python:
        raise UnsafeImage(
            f"a {image.format} whose decoder ({', '.join(python)}) runs in Python, which a "
            "small file can keep busy for seconds"
        )


def open_image(source: bytes | Path) -> ImageFile.ImageFile:
    """Open an encoded image (nothing decoded yet) of a supported format, its header checked.

    A file is walked through a read-only memory map, so a large one is not copied.

    Raises:
        UnsafeImage: from ``check_header`` or ``check_decoders``.
        PIL.UnidentifiedImageError: not an image of a supported format.
        OSError: the file cannot be read, or Pillow refuses its header.
    """
    if isinstance(source, Path):
        with source.open("rb") as file:
            if file.seek(0, io.SEEK_END):  # an empty file cannot be mapped; Pillow refuses it
                with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    check_header(mapped)
        image = Image.open(source, formats=_FORMATS)
    else:
        check_header(source)
        image = Image.open(io.BytesIO(source), formats=_FORMATS)
    try:
        check_decoders(image)
    except UnsafeImage:
        image.close()
        raise
    return image
