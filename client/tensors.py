"""numpy arrays to and from Open Inference Protocol tensors (raw little-endian contents)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contracts.oip_datatypes import (
    CONTENTS_FIELD,
    BytesFramingError,
    deserialize_bytes,
    serialize_bytes,
)
from contracts.oip_datatypes import datatype_of as _datatype_of
from contracts.oip_datatypes import numpy_dtype as _numpy_dtype
from protocol.inference import grpc_service_pb2 as pb


class TensorError(ValueError):
    """An array cannot be sent, or a response tensor cannot be decoded."""


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype string of an array; object and bytes arrays travel as BYTES."""
    datatype = _datatype_of(array.dtype)
    if datatype is None:
        raise TensorError(f"dtype {array.dtype} has no Open Inference Protocol datatype")
    return datatype


def encode(array: np.ndarray) -> tuple[str, bytes]:
    """The datatype and raw contents of ``array``: row-major, little-endian, no padding."""
    datatype = datatype_of(array)
    if datatype == "BYTES":
        return datatype, serialize_bytes(array.reshape(-1))
    return datatype, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


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
    try:
        return deserialize_bytes(raw, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    except BytesFramingError as error:
        raise TensorError(f"BYTES tensor: {error}") from None


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a fixed-size OIP datatype (not BYTES)."""
    if datatype == "BYTES":
        raise TensorError("BYTES has no fixed-size numpy dtype")
    try:
        return _numpy_dtype(datatype)
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
    field = CONTENTS_FIELD.get(tensor.datatype)
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
