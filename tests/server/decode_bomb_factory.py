"""Small files that are expensive to decode, built in memory for the decode-cost tests.

Each stays within the byte, pixel and aspect limits, so only the header check refuses it:
a progressive JPEG whose last scan repeats thousands of times (entropy decoding is paid per
scan, whatever ``draft`` shrinks), a 16-bit PNG of 50 MP zeros (~100 KB), and a BMP whose RLE8
stream Pillow decodes in pure Python.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

# The server's and the trainer's default pixel limit is 50 M; 7071^2 is just under it.
WIDE_PNG_SIDE = 7071
#: File names of the corpus ``write_bombs`` writes.
REPEATED_SCAN_JPEG = "repeated-scan.jpg"
RLE8_BMP = "rle8.bmp"
WIDE_PNG = "sixteen-bit.png"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(marker, offset) of each marker before the entropy-coded data of each scan."""
    found, offset = [], 2
    while offset + 4 <= len(data):
        marker = data[offset + 1]
        length = struct.unpack(">H", data[offset + 2 : offset + 4])[0]
        found.append((marker, offset))
        offset += 2 + length
        if marker == 0xDA:  # the scan's data runs to the next marker that is not RSTn/stuffing
            while not (data[offset] == 0xFF and data[offset + 1] not in (0x00, *range(0xD0, 0xD8))):
                offset += 1
    return found


def repeated_scan_jpeg(side: int = 4000, repeats: int = 10_000) -> bytes:
    """A progressive JPEG ``side`` x ``side`` whose last scan is repeated ``repeats`` times."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 200)).save(
        buffer, format="JPEG", progressive=True, quality=90
    )
    data = buffer.getvalue()
    last_scan = max(offset for marker, offset in _jpeg_segments(data) if marker == 0xDA)
    end = data.rindex(b"\xff\xd9")
    return data[:last_scan] + data[last_scan:end] * repeats + data[end:]


def sixteen_bit_png(side: int = WIDE_PNG_SIDE, value: int = 0) -> bytes:
    """A 16-bit greyscale PNG ``side`` x ``side`` of one ``value`` (~100 KB at 50 MP)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" + struct.pack(">H", value) * side  # filter type 0, then the samples
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def bmp(  # noqa: PLR0913  each keyword is one field of the generated header
    width: int,
    height: int,
    *,
    compression: int,
    bits: int = 8,
    masks: tuple[int, ...] = (),
    pixels: bytes = b"",
) -> bytes:
    """A BMP (BITMAPINFOHEADER): a grey palette for ``bits`` <= 8, the bitfield ``masks``
    (after the header), then ``pixels`` as given."""
    colors = 1 << bits if bits <= 8 else 0
    palette = b"".join(bytes((i, i, i, 0)) for i in range(colors))
    palette += b"".join(struct.pack("<I", mask) for mask in masks)
    offset = 14 + 40 + len(palette)
    info = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, 0, 0
    )
    head = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return head + info + palette + pixels


def rle8_bmp(width: int = 40_000, height: int = 1250) -> bytes:
    """A BMP with RLE8 compression: one pixel, then end-of-line, on every row (~6 KB).

    Pillow's RLE decoder fills each row's remainder one Python byte at a time.
    """
    row = b"\x01\x07" + b"\x00\x00"  # a run of one pixel of colour 7, then end of line
    return bmp(width, height, compression=1, pixels=row * height + b"\x00\x01")


def write_bombs(folder: Path) -> Path:
    """The three hostile files, each within the byte, pixel and aspect limits, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPEATED_SCAN_JPEG).write_bytes(repeated_scan_jpeg())
    (folder / RLE8_BMP).write_bytes(rle8_bmp())
    (folder / WIDE_PNG).write_bytes(sixteen_bit_png())
    return folder
