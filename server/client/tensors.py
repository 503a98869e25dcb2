"""numpy arrays to and from Open Inference Protocol tensors (raw little-endian contents)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from server._proto.inference import grpc_service_pb2 as pb

_DTYPE_TO_DATATYPE: dict[np.dtype, str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}
_DATATYPE_TO_DTYPE = {name: dtype for dtype, name in _DTYPE_TO_DATATYPE.items()}

# Typed-contents field of each datatype, for servers that answer without raw contents.
_CONTENTS_FIELD = {
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


class TensorError(ValueError):
    """An array cannot be sent, or a response tensor cannot be decoded."""


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype string of an array; object and bytes arrays travel as BYTES."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _DTYPE_TO_DATATYPE[array.dtype.newbyteorder("=")]
    except KeyError:
        raise TensorError(f"dtype {array.dtype} has no Open Inference Protocol datatype") from None


def encode(array: np.ndarray) -> tuple[str, bytes]:
    """The datatype and raw contents of ``array``: row-major, little-endian, no padding."""
    datatype = datatype_of(array)
    if datatype == "BYTES":
        return datatype, _encode_bytes(array)
    return datatype, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _encode_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def decode(datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """An array from raw contents; BYTES elements come back as an object array of ``bytes``."""
    shape = tuple(int(d) for d in shape)
    if datatype == "BYTES":
        return _decode_bytes(shape, raw)
    dtype = numpy_dtype(datatype)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"{datatype} tensor of shape {list(shape)} needs {expected} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def _decode_bytes(shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    items: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise TensorError("BYTES tensor ends inside an element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError("BYTES tensor ends inside an element")
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise TensorError(f"BYTES tensor has {len(raw) - offset} bytes after its last element")
    result = np.empty(count, dtype=object)
    result[:] = items
    return result.reshape(shape)


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a fixed-size OIP datatype (not BYTES)."""
    try:
        return _DATATYPE_TO_DTYPE[datatype]
    except KeyError:
        raise TensorError(f"unsupported datatype {datatype!r}") from None


def build_infer_request(
    model_name: str,
    inputs: dict[str, np.ndarray],
    *,
    outputs: Sequence[str] = (),
    model_version: str = "",
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying every input in ``raw_input_contents``."""
    if not inputs:
        raise TensorError("at least one input is needed")
    request = pb.ModelInferRequest(
        model_name=model_name, model_version=model_version, id=request_id
    )
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype, raw = encode(array)
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def parse_infer_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output arrays by name, from raw contents when present, else from typed contents."""
    if response.raw_output_contents and len(response.raw_output_contents) != len(response.outputs):
        raise TensorError(
            f"response has {len(response.outputs)} outputs but "
            f"{len(response.raw_output_contents)} raw contents"
        )
    result: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        if response.raw_output_contents:
            result[tensor.name] = decode(
                tensor.datatype, tensor.shape, response.raw_output_contents[i]
            )
        else:
            result[tensor.name] = _from_contents(tensor)
    return result


def _from_contents(tensor: pb.ModelInferResponse.InferOutputTensor) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise TensorError(f"datatype {tensor.datatype!r} only travels as raw contents")
    values = list(getattr(tensor.contents, field))
    shape = tuple(int(d) for d in tensor.shape)
    if tensor.datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = values
    else:
        array = np.asarray(values, dtype=numpy_dtype(tensor.datatype))
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise TensorError(f"output {tensor.name!r} has {array.size} values for shape {shape}")
    return array.reshape(shape)
