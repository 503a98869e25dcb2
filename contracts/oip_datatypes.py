"""The Open Inference Protocol's datatype vocabulary and BYTES framing, written once.

The server's converters, onnxruntime sessions and model configuration and the client all use
these tables. Only numpy is imported, so the client can use this module without onnxruntime.

Tensors travel row-major, little-endian, without padding. A BYTES tensor is a sequence of
elements, each a 4-byte little-endian unsigned length followed by that many bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

# OIP datatype -> numpy dtype (BYTES: object arrays of bytes).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    # numpy has no bfloat16; BF16 travels raw and is carried as its 16-bit pattern.
    "BF16": np.dtype("<u2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

# numpy dtype (native order) -> OIP datatype, for arrays a client sends. BF16 is left out: a
# uint16 array is UINT16.
_DATATYPE_OF_DTYPE: dict[np.dtype, str] = {
    dtype.newbyteorder("="): name
    for name, dtype in DATATYPES.items()
    if name not in ("BF16", "BYTES")
}

# OIP datatype -> the InferTensorContents field carrying it (FP16 and BF16 only travel raw).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# ONNX element type (as onnxruntime names it) -> OIP datatype.
ONNX_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Triton model configuration DataType name -> OIP datatype (TYPE_STRING is BYTES).
CONFIG_TYPES: dict[str, str] = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
    "TYPE_BF16": "BF16",
}
DATATYPE_TO_CONFIG_TYPE: dict[str, str] = {oip: name for name, oip in CONFIG_TYPES.items()}


class BytesFramingError(ValueError):
    """BYTES contents whose length prefixes do not add up."""


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of an OIP datatype (object for BYTES).

    Raises:
        KeyError: for a name outside the vocabulary.
    """
    return DATATYPES[datatype]


def datatype_of(dtype: np.dtype) -> str | None:
    """The OIP datatype of a numpy dtype; object, bytes and str arrays are BYTES.

    Returns:
        None when the dtype has no OIP datatype (complex numbers, datetimes, ...).
    """
    if dtype.kind in "OSU":
        return "BYTES"
    return _DATATYPE_OF_DTYPE.get(dtype.newbyteorder("="))


def serialize_bytes(elements: Iterable[Any]) -> bytes:
    """Length-prefix every element (bytes, or str as UTF-8) and concatenate them."""
    parts = []
    for item in elements:
        value = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(value)))
        parts.append(value)
    return b"".join(parts)


def deserialize_bytes(raw: bytes, count: int) -> np.ndarray:
    """Split length-prefixed BYTES contents into an object array of exactly ``count`` values.

    Raises:
        BytesFramingError: a truncated length or element, trailing bytes, or a count that
            differs from ``count``.
    """
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BytesFramingError("truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BytesFramingError("BYTES element longer than the data")
        items.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise BytesFramingError(f"{len(items)} BYTES elements, shape needs {count}")
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array
