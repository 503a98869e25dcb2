"""Bounded walks over a request's protobuf wire bytes, before the message is parsed.

Parsing is where a small message grows: 16 M empty strings are 32 MB on the wire and 500 MiB
once protobuf holds them (a 16-byte view each, in arrays that double), 31 M one-byte shape
dimensions 250 MiB, 16 M empty submessages more. So the payload methods' bytes are walked
first: each repeated field's occurrences are counted up to its limit and the walk stops
there, so it costs at most a few hundred steps, and a message that passes parses into little
more than its own size.

Typed tensor contents wait longer: a ModelInferRequest is parsed staged (the same message with
each input's ``contents`` declared bytes), and an input's contents are walked
(``check_contents``) and parsed only once the model has accepted the input's header.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from protocol.finetune.v1 import classifier_pb2
from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import model_config_pb2
from server.errors import InvalidInput, shown

# A tensor's rank: numpy refuses more than 64, ONNX image models use 4.
MAX_RANK = 8
# Inputs, requested outputs, raw contents of one request.
MAX_TENSORS = 128
# Parameters of a request, of one input, of one requested output.
MAX_PARAMETERS = 64
# Field occurrences of one message besides its images: a well-formed request has a few.
MAX_OTHER_FIELDS = 1024

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5

_REQUEST = pb.ModelInferRequest.DESCRIPTOR
_INPUT = pb.ModelInferRequest.InferInputTensor.DESCRIPTOR
_OUTPUT = pb.ModelInferRequest.InferRequestedOutputTensor.DESCRIPTOR
_CONTENTS = pb.InferTensorContents.DESCRIPTOR
_CLASSIFY = classifier_pb2.ClassifyRequest.DESCRIPTOR
# How each scalar type travels when not packed (bytes are never packed).
_WIRE_TYPE = {
    _CONTENTS.fields_by_name[name].number: wire_type
    for name, wire_type in (
        ("bool_contents", VARINT),
        ("int_contents", VARINT),
        ("int64_contents", VARINT),
        ("uint_contents", VARINT),
        ("uint64_contents", VARINT),
        ("fp32_contents", FIXED32),
        ("fp64_contents", FIXED64),
        ("bytes_contents", LENGTH_DELIMITED),
    )
}


class _TruncatedError(Exception):
    """The bytes end inside a field."""


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 70:
        if position >= len(data):
            raise _TruncatedError
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
    raise _TruncatedError


def _fields(data: memoryview, limit: int, where: str) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each occurrence, at most ``limit`` of them.

    The value is an int (varint), or a memoryview of the field's bytes.
    """
    position = 0
    try:
        for _ in range(limit):
            if position >= len(data):
                return
            key, position = _varint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == VARINT:
                value, position = _varint(data, position)
                yield number, wire_type, value
                continue
            if wire_type == LENGTH_DELIMITED:
                size, position = _varint(data, position)
            elif wire_type in (FIXED32, FIXED64):
                size = 4 if wire_type == FIXED32 else 8
            else:  # groups: no field of these messages is one
                raise InvalidInput(f"{where}: not a valid message (wire type {wire_type})")
            if position + size > len(data):
                raise _TruncatedError
            yield number, wire_type, data[position : position + size]
            position += size
    except _TruncatedError:
        raise InvalidInput(f"{where}: not a valid message (truncated)") from None
    if position < len(data):
        raise InvalidInput(f"{where}: more than {limit} fields")


# Packed varints shorter than this are counted in Python: numpy's call costs more than the
# loop for a shape's few bytes (every request has one).
_NUMPY_COUNT_BYTES = 64


def _packed_count(wire_type: int, value: Any, element_type: int) -> int:
    """Elements in one occurrence of a repeated scalar field, packed or not."""
    if wire_type != LENGTH_DELIMITED or element_type == LENGTH_DELIMITED:
        return 1
    if element_type == VARINT:  # each varint ends with a byte below 0x80
        if len(value) < _NUMPY_COUNT_BYTES:
            return sum(byte < 0x80 for byte in value)
        return int(np.count_nonzero(np.frombuffer(value, np.uint8) < 0x80))
    return len(value) // (4 if element_type == FIXED32 else 8)


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8", "replace") if isinstance(value, memoryview) else ""


_INPUT_NAME, _INPUT_SHAPE, _INPUT_PARAMETERS = (
    _INPUT.fields_by_name[name].number for name in ("name", "shape", "parameters")
)
_OUTPUT_PARAMETERS = _OUTPUT.fields_by_name["parameters"].number
_REQUEST_INPUTS, _REQUEST_OUTPUTS = (
    _REQUEST.fields_by_name[name].number for name in ("inputs", "outputs")
)


def _check_input(index: int, data: memoryview) -> None:
    where = f"inputs[{index}]"
    name, rank, parameters = None, 0, 0
    for number, wire_type, value in _fields(data, MAX_OTHER_FIELDS, where):
        if number == _INPUT_NAME:
            name = _text(value)
        elif number == _INPUT_SHAPE:
            rank += _packed_count(wire_type, value, VARINT)
        elif number == _INPUT_PARAMETERS:
            parameters += 1
    if name is not None:
        where = f"{where} ({shown(name)})"
    if rank > MAX_RANK:
        raise InvalidInput(f"{where}: shape has {rank} dimensions; at most {MAX_RANK} are accepted")
    if parameters > MAX_PARAMETERS:
        raise InvalidInput(f"{where}: more than {MAX_PARAMETERS} parameters")


def _check_output(index: int, data: memoryview) -> None:
    where = f"outputs[{index}]"
    fields = _fields(data, MAX_OTHER_FIELDS, where)
    found = sum(number == _OUTPUT_PARAMETERS for number, _, _ in fields)
    if found > MAX_PARAMETERS:
        raise InvalidInput(f"{where}: more than {MAX_PARAMETERS} parameters")


_REPEATED_LIMITS = {
    _REQUEST.fields_by_name["inputs"].number: ("inputs", MAX_TENSORS),
    _REQUEST.fields_by_name["outputs"].number: ("outputs", MAX_TENSORS),
    _REQUEST.fields_by_name["raw_input_contents"].number: ("raw_input_contents", MAX_TENSORS),
    _REQUEST.fields_by_name["parameters"].number: ("parameters", MAX_PARAMETERS),
}


def check_infer_request(data: bytes) -> None:
    """Refuse a ModelInferRequest whose parse would cost more than a few times its size.

    Raises:
        InvalidInput: more than MAX_TENSORS inputs, outputs or raw contents, more than
            MAX_PARAMETERS parameters anywhere, a shape of more than MAX_RANK dimensions,
            or bytes that are not a message.
    """
    counts = dict.fromkeys(_REPEATED_LIMITS, 0)
    for number, wire_type, value in _fields(memoryview(data), MAX_OTHER_FIELDS, "request"):
        if number not in counts:
            continue
        counts[number] += 1
        name, limit = _REPEATED_LIMITS[number]
        if counts[number] > limit:
            raise InvalidInput(f"{name}: more than {limit} entries; the limit is {limit}")
        if wire_type != LENGTH_DELIMITED:
            continue  # not the message type: kept as an unknown field, as bytes
        if number == _REQUEST_INPUTS:
            _check_input(counts[number] - 1, value)
        elif number == _REQUEST_OUTPUTS:
            _check_output(counts[number] - 1, value)


def check_classify_request(data: bytes, max_images: int) -> None:
    """Refuse a ClassifyRequest of more than ``max_images`` images before it is parsed.

    Raises:
        InvalidInput: naming ``max_images_per_request``.
    """
    images = _CLASSIFY.fields_by_name["images"].number
    found = 0
    fields = _fields(memoryview(data), max_images + MAX_OTHER_FIELDS, "request")
    for number, _, _ in fields:
        found += number == images
        if found > max_images:
            raise InvalidInput(
                f"images: more than {max_images} images; the limit (max_images_per_request) "
                f"is {max_images}"
            )


def check_contents(data: bytes, field: str, count: int, where: str, datatype: str) -> None:
    """Refuse typed contents (InferTensorContents' wire bytes) holding another field than
    ``field`` or other than ``count`` elements, before they are parsed; the walk stops once
    it has seen too many.

    Raises:
        InvalidInput: naming the field and the counts.
    """
    expected = _CONTENTS.fields_by_name[field].number
    element_type = _WIRE_TYPE[expected]
    found = 0
    # Packed: one occurrence per field; unpacked: one per element.
    for number, wire_type, value in _fields(memoryview(data), count + MAX_OTHER_FIELDS, where):
        if number != expected:
            other = _CONTENTS.fields_by_number.get(number)
            other_name = other.name if other is not None else f"field {number}"
            raise InvalidInput(
                f"{where}: {other_name} set for a {datatype} tensor; expected {field}"
            )
        found += _packed_count(wire_type, value, element_type)
        if found > count:
            break
    if found != count:
        shown_found = f"more than {count}" if found > count else str(found)
        raise InvalidInput(f"{where}: {shown_found} values in {field}, the shape needs {count}")


@functools.cache
def _staged_class() -> Any:
    """ModelInferRequest with ``InferInputTensor.contents`` declared bytes, in its own pool."""
    pool = descriptor_pool.DescriptorPool()
    for module in (model_config_pb2, pb):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        if module is pb:
            request = next(m for m in proto.message_type if m.name == _REQUEST.name)
            tensor = next(m for m in request.nested_type if m.name == _INPUT.name)
            contents = next(f for f in tensor.field if f.name == "contents")
            contents.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            contents.ClearField("type_name")
        pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(_REQUEST.full_name))


def parse_staged_infer_request(data: bytes) -> Any:
    """A ModelInferRequest whose inputs' ``contents`` are their unparsed wire bytes.

    Raises:
        InvalidInput: what ``check_infer_request`` refuses, or bytes protobuf cannot parse.
    """
    check_infer_request(data)
    try:
        return _staged_class().FromString(data)
    except Exception:  # protobuf's DecodeError; the walk caught what it could name
        raise InvalidInput("request: not a valid ModelInferRequest") from None


def parse_classify_request(data: bytes, max_images: int) -> classifier_pb2.ClassifyRequest:
    """A ClassifyRequest, parsed only when it holds at most ``max_images`` images.

    Raises:
        InvalidInput: too many images, or bytes protobuf cannot parse.
    """
    check_classify_request(data, max_images)
    try:
        return classifier_pb2.ClassifyRequest.FromString(data)
    except Exception:  # protobuf's DecodeError
        raise InvalidInput("request: not a valid ClassifyRequest") from None
