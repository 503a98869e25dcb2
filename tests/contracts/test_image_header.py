"""The header check both halves run before decoding: ordinary files of every accepted format
pass, each expensive structure is refused at its limit, and no input makes the check itself
raise anything else or take long."""

from __future__ import annotations

import contextlib
import gc
import io
import re
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from decode_bomb_factory import bmp, repeated_scan_jpeg, rle8_bmp
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, UnidentifiedImageError

from contracts.image_header import (
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_JPEG_STRAY_BYTES,
    MAX_PNG_CHUNKS,
    UnsafeImage,
    check_decoders,
    check_header,
    open_image,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow's progressive JPEG: 10 scans in colour, 6 in grey, 18 in CMYK.
BASE_SCANS = 10


def _encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _with_exif_and_icc() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    icc = b"\x00" * 200_000  # split by Pillow into four APP2 segments
    return _encode(Image.new("RGB", (40, 30)), "JPEG", exif=exif.tobytes(), icc_profile=icc)


def _after_first_segment(data: bytes, insert: bytes) -> bytes:
    """``insert`` placed after the JPEG's first segment (APP0), before the others."""
    end = 4 + int.from_bytes(data[4:6], "big")
    return data[:end] + insert + data[end:]


ORDINARY: dict[str, Callable[[], bytes]] = {
    "baseline JPEG": lambda: _encode(Image.new("RGB", (40, 30), (9, 99, 199)), "JPEG"),
    "progressive JPEG": lambda: _encode(Image.new("RGB", (40, 30)), "JPEG", progressive=True),
    "progressive grey JPEG": lambda: _encode(Image.new("L", (40, 30)), "JPEG", progressive=True),
    "progressive CMYK JPEG": lambda: _encode(
        Image.new("CMYK", (40, 30)), "JPEG", progressive=True
    ),
    "JPEG with EXIF and ICC": _with_exif_and_icc,
    "JPEG with restart markers": lambda: _encode(
        Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG", restart_marker_blocks=1
    ),
    "JPEG with 1,000 comments": lambda: _after_first_segment(
        _encode(Image.new("RGB", (8, 8)), "JPEG"), b"\xff\xfe\x00\x02" * 1000
    ),
    "JPEG with stray bytes": lambda: _after_first_segment(
        _encode(Image.new("RGB", (8, 8)), "JPEG"), b"\x00" * 1000
    ),
    f"JPEG of {MAX_JPEG_SCANS} scans": lambda: repeated_scan_jpeg(
        64, MAX_JPEG_SCANS - BASE_SCANS + 1
    ),
    "PNG": lambda: _encode(Image.effect_noise((40, 30), 50), "PNG"),
    "PNG with text": lambda: _encode(Image.new("RGB", (8, 8)), "PNG", pnginfo=_text(100)),
    "16-bit PNG": lambda: _encode(Image.new("I;16", (40, 30), 40_000), "PNG"),
    "WebP": lambda: _encode(Image.new("RGB", (40, 30)), "WEBP"),
    "BMP": lambda: _encode(Image.new("RGB", (40, 30)), "BMP"),
    "palette BMP": lambda: _encode(Image.new("P", (40, 30)), "BMP"),
    "bitfields BMP": lambda: bmp(
        2, 2, compression=3, bits=32, masks=(0xFF0000, 0xFF00, 0xFF), pixels=bytes(16)
    ),
    "OS/2 BMP": lambda: b"BM" + struct.pack("<IHHI", 32, 0, 0, 26)
    + struct.pack("<IHHHH", 12, 1, 1, 1, 24) + b"\x00" * 6,
}  # fmt: skip


def _text(count: int) -> object:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for index in range(count):
        info.add_text(f"key{index}", "value")
    return info


@pytest.mark.parametrize("name", list(ORDINARY))
def test_ordinary_files_pass_and_decode(name: str, tmp_path: Path) -> None:
    data = ORDINARY[name]()
    check_header(data)
    path = tmp_path / "image"
    path.write_bytes(data)
    for source in (data, path):
        with open_image(source) as image:
            image.load()
            assert image.size[0] >= 1


REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "JPEG of 33 scans": (
        lambda: repeated_scan_jpeg(64, MAX_JPEG_SCANS - BASE_SCANS + 2),
        "a JPEG of more than 32 scans",
    ),
    "JPEG of many empty comments": (
        lambda: _after_first_segment(
            _encode(Image.new("RGB", (8, 8)), "JPEG"), b"\xff\xfe\x00\x02" * MAX_JPEG_SEGMENTS
        ),
        "a JPEG of more than 1024 marker segments",
    ),
    "JPEG with a stray run": (
        lambda: _after_first_segment(
            _encode(Image.new("RGB", (8, 8)), "JPEG"), b"\x00" * (MAX_JPEG_STRAY_BYTES + 1)
        ),
        "a JPEG with more than 65536 stray bytes",
    ),
    "PNG of many chunks": (
        lambda: PNG_SIGNATURE + _chunk(b"prVt", b"") * (MAX_PNG_CHUNKS + 1),
        "a PNG of more than 65536 chunks",
    ),
    "RLE8 BMP": (rle8_bmp, "a BMP with RLE8 compression"),
    "RLE4 BMP": (
        lambda: bmp(8, 2, compression=2, bits=4, pixels=b"\x08\x11\x00\x00" * 2),
        "a BMP with RLE4 compression",
    ),
    "JPEG in a BMP": (lambda: bmp(8, 8, compression=4, bits=24), "a BMP with JPEG compression"),
    "PNG in a BMP": (lambda: bmp(8, 8, compression=5, bits=24), "a BMP with PNG compression"),
    "unknown BMP compression": (
        lambda: bmp(8, 8, compression=42, bits=24),
        "a BMP with unknown (42) compression",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_expensive_structures_are_refused_naming_the_problem(name: str, tmp_path: Path) -> None:
    build, message = REFUSED[name]
    data = build()
    with pytest.raises(UnsafeImage, match=f"^{re.escape(message)}"):
        check_header(data)
    path = tmp_path / "image"
    path.write_bytes(data)
    with pytest.raises(UnsafeImage, match=f"^{re.escape(message)}"):
        open_image(path)


def test_python_decoders_are_refused_after_opening() -> None:
    # Whatever slips past the byte walk: a tile Pillow would decode in Python.
    with (
        Image.open(io.BytesIO(rle8_bmp(64, 4))) as image,
        pytest.raises(UnsafeImage, match=r"^a BMP whose decoder \(bmp_rle\) runs in Python"),
    ):
        check_decoders(image)


def test_unsupported_and_empty_files_are_left_to_pillow(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    gif = _encode(Image.new("RGB", (8, 8)), "GIF")
    for source in (empty, b"", gif, b"\xff\xd8"):
        with pytest.raises(UnidentifiedImageError):
            open_image(source)


@pytest.mark.parametrize(
    "pattern",
    [b"\xff", b"\xff\x00", b"\xff\xd0"],
    ids=["fill bytes", "stuffed zeros", "restart markers"],
)
def test_the_walk_of_a_hostile_scan_at_the_byte_limit_is_cheap(pattern: bytes) -> None:
    # 32 MiB, the server's byte limit, of the scan data that makes the marker search slowest
    # (measured: 0.2 to 0.4 s).
    data = _encode(Image.new("RGB", (8, 8)), "JPEG")
    start = data.index(b"\xff\xda")
    header_end = start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")
    hostile = data[:header_end] + pattern * ((32 << 20) // len(pattern)) + b"\xff\xd9"
    cpu = time.thread_time()
    check_header(hostile)
    assert time.thread_time() - cpu < 1.5


def _checked_quickly(data: bytes) -> None:
    """check_header passes or raises UnsafeImage, within a few ms of CPU."""
    gc.disable()  # a collection of the test process's objects is not the walk's cost
    try:
        cpu = time.thread_time()  # this thread's: another test's server threads may be busy
        with contextlib.suppress(UnsafeImage):
            check_header(data)
        elapsed = time.thread_time() - cpu
    finally:
        gc.enable()
    assert elapsed < 0.005, f"{elapsed * 1000:.1f} ms for {len(data)} bytes"


SIGNATURES = [b"", b"\xff\xd8", b"\xff\xd8\xff", PNG_SIGNATURE, b"BM", b"RIFF"]
SAMPLES = [ORDINARY[name]() for name in ("progressive JPEG", "JPEG with EXIF and ICC", "PNG")]
SAMPLES += [rle8_bmp(64, 4), repeated_scan_jpeg(16, 30)]


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from(SIGNATURES), tail=st.binary(max_size=4096))
def test_random_bytes_only_ever_raise_unsafe_image(prefix: bytes, tail: bytes) -> None:
    _checked_quickly(prefix + tail)


@settings(max_examples=300, deadline=None)
@given(
    sample=st.sampled_from(SAMPLES),
    cut=st.integers(0, 1 << 20),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
)
def test_truncated_and_damaged_headers_only_ever_raise_unsafe_image(
    sample: bytes, cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(sample[: cut % (len(sample) + 1)])
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    _checked_quickly(bytes(data))
