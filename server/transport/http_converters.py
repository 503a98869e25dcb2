"""Inference over HTTP/REST: KServe v2 JSON bodies (and Triton's binary tensor extension) <->
the plain types the handlers take. ``http_metadata`` and ``http_classify`` convert the other
endpoints' bodies.

The REST twin of ``converters``: the same plain (staged) requests, checked by the same shape
and raw byte rules (``converters.element_count``, ``converters.raw_conversion``), for the same
handlers. As there, every check that needs no tensor runs here and each input is staged, not
converted: the handler converts it once the model, the names, shapes and the byte budget have
accepted the request. Nothing here knows aiohttp: functions take and return bytes and
JSON-able values, so they are tested without a server.

Triton's binary extension: with ``Inference-Header-Content-Length: N`` the first N bytes of
the body are the JSON header; the inputs whose ``parameters`` carry ``binary_data_size``
follow it, raw (little-endian, row-major; BYTES length-prefixed), in the order of ``inputs``.
Outputs come back the same way when asked for with ``binary_data`` (per output) or
``binary_data_output`` (the whole request); the answer then carries the header too.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contracts.oip_datatypes import DATATYPES, serialize_bytes
from server.errors import InvalidInput, MessageTooLarge, shown
from server.handlers.staged_request import StagedInferRequest, StagedTensor
from server.transport.converters import element_count, raw_conversion
from server.types import InferResponse, Tensor

HEADER_LENGTH = "Inference-Header-Content-Length"
# json.loads holds every number as a Python object (a float costs 24 bytes plus its list
# slot, against 4-10 bytes of text): the JSON part of a request is capped below the body's
# limit so that one request cannot cost gigabytes while it is parsed. Large tensors travel
# in the binary extension.
MAX_JSON_BYTES = 16 * 1024 * 1024
_HEADER_LENGTH_TEXT = re.compile(r"[0-9]{1,19}")
# What a JSON ``data`` array may hold per datatype: numpy's kind of the parsed array.
_JSON_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}
_INTEGER_KINDS = "iu"
# What converting one JSON element costs besides the parsed value itself: numpy's 8-byte
# array of the parsed list before it is narrowed; a BYTES element, its bytes object and slots.
_JSON_NUMBER_COST = 8
_JSON_BYTES_ELEMENT_COST = 64


@dataclass(frozen=True)
class OutputEncoding:
    """How each output of an answer travels: binary (after the JSON header) or JSON ``data``."""

    binary_default: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _expect(value: Any, kind: type, where: str) -> Any:
    wanted = {str: "a string", list: "an array", dict: "an object", bool: "a boolean"}[kind]
    if not isinstance(value, kind):
        raise InvalidInput(f"{where}: expected {wanted}, got {_kind(value)}")
    return value


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_json(data: bytes, where: str = "request body") -> dict[str, Any]:
    """A JSON object, or InvalidInput saying what is wrong and where."""
    if len(data) > MAX_JSON_BYTES:
        raise MessageTooLarge(
            f"{where}: the JSON is {len(data)} bytes; at most {MAX_JSON_BYTES} are accepted "
            "(send large tensors as binary data, binary_data_size)"
        )
    try:
        document = json.loads(data)
    except UnicodeDecodeError:
        raise InvalidInput(f"{where}: the JSON is not UTF-8") from None
    except RecursionError:
        raise InvalidInput(f"{where}: the JSON nests too deeply") from None
    except ValueError as error:  # JSONDecodeError, and integers of more than 4300 digits
        raise InvalidInput(f"{where} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {_kind(document)}")
    return document


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensors after it (empty without the extension)."""
    if header_length is None:
        return body, memoryview(b"")
    # HTTP's optional whitespace is spaces and tabs; str.strip() would also take control
    # characters such as \x1f, which int() then refuses (found by the property test).
    text = header_length.strip(" \t")
    if not _HEADER_LENGTH_TEXT.fullmatch(text):
        raise InvalidInput(f"{HEADER_LENGTH}: {header_length!r} is not a byte count")
    length = int(text)
    if length > len(body):
        raise InvalidInput(f"{HEADER_LENGTH}: {length} is more than the body's {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def _parameters(value: Any, where: str) -> dict[str, Any]:
    """OIP parameters: a JSON object of booleans, integers, numbers and strings."""
    if value is None:
        return {}
    _expect(value, dict, where)
    for key, item in value.items():
        if not isinstance(item, (bool, int, float, str)):
            raise InvalidInput(
                f"{where}[{key!r}]: expected a boolean, number or string, got {_kind(item)}"
            )
    return dict(value)


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_integer(d) for d in value):
        raise InvalidInput(f"{where}.shape: expected an array of integers")
    return list(value)


@dataclass(frozen=True)
class _InputPlan:
    """One input, checked and located, before any tensor is built."""

    name: str
    datatype: str
    shape: list[int]
    where: str
    data: Any = None
    binary: tuple[int, int] | None = None  # (start, end) in the binary part


def _plan_input(entry: Any, index: int, offset: int, binary_size: int) -> _InputPlan:
    where = f"inputs[{index}]"
    _expect(entry, dict, where)
    name = _expect(entry.get("name"), str, f"{where}.name")
    where = f"inputs[{index}] ({shown(name)})"
    datatype = _expect(entry.get("datatype"), str, f"{where}.datatype")
    if datatype not in DATATYPES:
        raise InvalidInput(f"{where}: unknown datatype {shown(datatype)}")
    shape = _shape(entry.get("shape"), where)
    count = element_count(shape, where)
    parameters = _parameters(entry.get("parameters"), f"{where}.parameters")
    if any(key.startswith("shared_memory") for key in parameters):
        raise InvalidInput(f"{where}: shared memory is not supported; send the data")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise InvalidInput(f"{where}: needs data, or parameters.binary_data_size")
        return _InputPlan(name, datatype, shape, where, data=entry["data"])
    if not _is_integer(size) or size < 0:
        raise InvalidInput(f"{where}.parameters.binary_data_size: expected an integer >= 0")
    if "data" in entry:
        raise InvalidInput(f"{where}: has both data and parameters.binary_data_size")
    if offset + size > binary_size:
        raise InvalidInput(
            f"{where}: binary_data_size {size} runs past the {binary_size} bytes of binary "
            f"data after the JSON header ({HEADER_LENGTH})"
        )
    if datatype != "BYTES" and size != count * DATATYPES[datatype].itemsize:
        raise InvalidInput(
            f"{where}: binary_data_size is {size} bytes, shape {shape} of {datatype} needs "
            f"{count * DATATYPES[datatype].itemsize}"
        )
    return _InputPlan(name, datatype, shape, where, binary=(offset, offset + size))


def _plan_inputs(document: dict[str, Any], binary_size: int) -> list[_InputPlan]:
    """Names, datatypes, shapes and binary sizes of every input, before any is converted."""
    entries = _expect(document.get("inputs"), list, "inputs")
    plans: list[_InputPlan] = []
    offset = 0
    for index, entry in enumerate(entries):
        plan = _plan_input(entry, index, offset, binary_size)
        if any(p.name == plan.name for p in plans):
            raise InvalidInput(f"{plan.where}: duplicate input name")
        if plan.binary is not None:
            offset = plan.binary[1]
        plans.append(plan)
    if offset != binary_size:
        raise InvalidInput(
            f"{binary_size - offset} bytes of binary data after the inputs' binary_data_size "
            "total are unaccounted for"
        )
    return plans


_END = object()


def _strings(data: list[Any], where: str) -> list[bytes]:
    """The strings of a flat or nested JSON array, row-major, as UTF-8 bytes."""
    values: list[bytes] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        elif isinstance(item, str):
            try:
                values.append(item.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
                raise InvalidInput(f"{where}.data: a string is not valid Unicode") from None
        else:
            raise InvalidInput(f"{where}.data: a BYTES tensor holds strings, got {_kind(item)}")
    return values


def json_to_array(data: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """A tensor from JSON ``data`` (flat or nested, row-major), range-checked to its datatype."""
    count = element_count(shape, where)
    _expect(data, list, f"{where}.data")
    if datatype == "BF16":
        raise InvalidInput(f"{where}: BF16 travels only as binary data (binary_data_size)")
    if datatype == "BYTES":
        strings = _strings(data, where)
        if len(strings) != count:
            raise InvalidInput(
                f"{where}: {len(strings)} values in data, shape {shape} needs {count}"
            )
        array = np.empty(count, dtype=np.object_)
        array[:] = strings
        return array.reshape(shape)
    try:
        parsed = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidInput(f"{where}.data: not a rectangular array of numbers") from None
    if parsed.size != count:
        raise InvalidInput(f"{where}: {parsed.size} values in data, shape {shape} needs {count}")
    dtype = DATATYPES[datatype]
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    kinds = _JSON_KINDS.get(datatype, _INTEGER_KINDS)
    if parsed.dtype.kind not in kinds:
        wanted = {"b": "booleans", "iuf": "numbers"}.get(kinds, "integers")
        raise InvalidInput(f"{where}.data: a {datatype} tensor holds {wanted}")
    if dtype.kind in _INTEGER_KINDS:
        info = np.iinfo(dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise InvalidInput(f"{where}: values out of range for {datatype}")
    with np.errstate(over="ignore"):  # a number beyond FP16/FP32 becomes inf, as in C
        return parsed.astype(dtype).reshape(shape)


def _requested_outputs(
    document: dict[str, Any],
) -> tuple[list[str], dict[str, int], dict[str, bool]]:
    """Requested output names (each once), their class counts and their binary choice."""
    entries = document.get("outputs")
    if entries is None:
        return [], {}, {}
    _expect(entries, list, "outputs")
    names: list[str] = []
    class_counts: dict[str, int] = {}
    binary: dict[str, bool] = {}
    for index, entry in enumerate(entries):
        _expect(entry, dict, f"outputs[{index}]")
        name = _expect(entry.get("name"), str, f"outputs[{index}].name")
        where = f"outputs[{index}] ({shown(name)})"
        if name in names:
            raise InvalidInput(f"{where}: output requested more than once")
        names.append(name)
        parameters = _parameters(entry.get("parameters"), f"{where}.parameters")
        k = parameters.get("classification")
        if k is not None:
            if not _is_integer(k) or k < 1:
                raise InvalidInput(
                    f"{where}: parameters['classification'] must be a positive integer"
                )
            class_counts[name] = k
        if "binary_data" in parameters:
            binary[name] = _expect(
                parameters["binary_data"], bool, f"{where}.parameters.binary_data"
            )
    return names, class_counts, binary


def _deadline(parameters: dict[str, Any], received: float) -> float | None:
    """The OIP ``timeout`` parameter (microseconds) as a ``time.monotonic()`` deadline."""
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if not _is_integer(timeout):
        raise InvalidInput("parameters['timeout'] must be an integer (microseconds)")
    return received + timeout / 1e6 if timeout > 0 else None


def _stage(plan: _InputPlan, binary: memoryview, header_bytes: int) -> StagedTensor:
    """The input with what converting it costs at most and the conversion, not yet run."""
    conversion: Callable[[], np.ndarray]
    if plan.binary is not None:
        start, end = plan.binary
        raw = bytes(binary[start:end])
        cost, conversion = raw_conversion(raw, plan.datatype, plan.shape, plan.where)
    else:
        count = math.prod(plan.shape)
        if plan.datatype == "BYTES":  # the strings are in the JSON header
            cost = count * _JSON_BYTES_ELEMENT_COST + header_bytes
        else:
            cost = count * (_JSON_NUMBER_COST + DATATYPES[plan.datatype].itemsize)
        conversion = functools.partial(
            json_to_array, plan.data, plan.datatype, plan.shape, plan.where
        )
    return StagedTensor(plan.name, plan.datatype, tuple(plan.shape), cost, conversion)


def infer_request_from_http(
    body: bytes,
    header_length: str | None,
    model_name: str,
    model_version: str,
    received: float | None = None,
) -> tuple[StagedInferRequest, OutputEncoding]:
    """Check an infer body's form and stage its inputs; the handler checks them against the
    model and converts them (``json_to_array``, ``converters.raw_to_array``).

    Every check that needs no tensor (requested outputs, names, datatypes, shapes, binary
    sizes) runs here, as ``converters.stage_infer_request`` does for gRPC.

    Args:
        header_length: the ``Inference-Header-Content-Length`` header (None: JSON only).
        received: ``time.monotonic()`` at arrival, the start of the ``timeout`` parameter.
    """
    header, binary = split_body(body, header_length)
    document = parse_json(header)
    request_id = document.get("id", "")
    _expect(request_id, str, "id")
    parameters = _parameters(document.get("parameters"), "parameters")
    binary_default = parameters.get("binary_data_output", False)
    _expect(binary_default, bool, "parameters.binary_data_output")
    requested, class_counts, binary_outputs = _requested_outputs(document)
    plans = _plan_inputs(document, len(binary))
    request = StagedInferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=[_stage(plan, binary, len(header)) for plan in plans],
        requested_outputs=requested,
        parameters=parameters,
        deadline=_deadline(parameters, time.monotonic() if received is None else received),
        class_counts=class_counts,
    )
    return request, OutputEncoding(binary_default, binary_outputs)


def _json_values(tensor: Tensor) -> list[Any] | None:
    """The tensor's values, flat, for JSON; None when JSON cannot hold them."""
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BF16":
        return None
    if tensor.datatype == "BYTES":
        try:
            return [bytes(item).decode("utf-8") for item in flat]
        except UnicodeDecodeError:
            return None
    values: list[Any] = flat.tolist()
    return values


def _raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.data.reshape(-1))
    return np.ascontiguousarray(tensor.data, dtype=DATATYPES[tensor.datatype]).tobytes()


def infer_response_to_http(
    response: InferResponse, encoding: OutputEncoding
) -> tuple[bytes, int | None]:
    """The answer's body and, when some outputs are binary, the JSON header's length.

    An output JSON cannot hold (BF16, BYTES that are not UTF-8) travels binary whatever was
    asked: ``binary_data_size`` tells every client where it is.
    """
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        values = None if encoding.is_binary(tensor.name) else _json_values(tensor)
        if values is None:
            data = _raw(tensor)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = values
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        document["id"] = response.id
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
