"""The one place where protobuf messages and numpy arrays / plain dataclasses meet.

Raw tensors (``raw_input_contents``) are little-endian, row-major; BYTES elements are a 4-byte
little-endian length followed by the bytes. A request uses either raw contents for every input
or typed ``contents`` for every input, never both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from contracts.oip_datatypes import (
    CONTENTS_FIELD,
    DATATYPES,
    BytesFramingError,
    serialize_bytes,
)
from contracts.oip_datatypes import deserialize_bytes as _deserialize_bytes
from protocol.finetune.v1 import classifier_pb2
from protocol.inference import grpc_service_pb2 as pb
from server.errors import InvalidInput, shown
from server.handlers.staged_request import StagedInferRequest, StagedTensor
from server.statistics import VersionStatistics
from server.transport import wire
from server.transport.wire import MAX_RANK
from server.types import (
    ClassifyRequest,
    ClassifyResponse,
    InferResponse,
    ModelInfo,
)
from server.version_states import VersionState

_MAX_ELEMENTS = 1 << 31


def _parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def parameters_from_proto(parameters: Any) -> dict[str, Any]:
    return {key: _parameter_value(value) for key, value in parameters.items()}


def element_count(shape: list[int], where: str) -> int:
    """Elements of ``shape``; refuses too many dimensions, negative and oversized shapes
    (both transports)."""
    if len(shape) > MAX_RANK:
        raise InvalidInput(
            f"{where}: shape has {len(shape)} dimensions; at most {MAX_RANK} are accepted"
        )
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{where}: shape {shape} has a negative dimension")
    # Zero dimensions are skipped: numpy refuses [0, 2**40, 2**40] although it holds nothing.
    if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        raise InvalidInput(f"{where}: shape {shape} is too large")
    return math.prod(shape)


def deserialize_bytes(raw: bytes, count: int, where: str) -> np.ndarray:
    """Split length-prefixed BYTES elements into an object array of ``count`` bytes values."""
    try:
        return _deserialize_bytes(raw, count)
    except BytesFramingError as error:
        raise InvalidInput(f"{where}: {error}") from None


def raw_to_array(raw: bytes, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """A tensor from its raw bytes: gRPC's raw_input_contents and HTTP's binary extension."""
    count = element_count(shape, where)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, where).reshape(shape)
    dtype = DATATYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"{where}: raw contents are {len(raw)} bytes, shape {shape} of {datatype} needs "
            f"{expected}"
        )
    # frombuffer shares the message's memory; the copy makes the array writable and aligned.
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


# The numpy dtype each InferTensorContents field holds on the wire; protobuf has already
# range-checked the values to it, so one np.array call converts a whole field.
_FIELD_DTYPES: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


# What one BYTES element costs once converted, besides its bytes: a bytes object (33), its
# slots in a list and in the object array (8 + 8), and, for typed contents, protobuf's
# 16-byte view of it in an array that may have doubled.
_RAW_BYTES_ELEMENT_COST = 64
_TYPED_BYTES_ELEMENT_COST = 96


def raw_conversion(
    raw: bytes, datatype: str, shape: list[int], where: str
) -> tuple[int, Callable[[], np.ndarray]]:
    """(the bytes converting raw contents takes at most, the conversion): gRPC's
    raw_input_contents and HTTP's binary extension."""
    count = math.prod(shape)
    cost = count * _RAW_BYTES_ELEMENT_COST + len(raw) if datatype == "BYTES" else len(raw)
    return cost, functools.partial(raw_to_array, raw, datatype, shape, where)


def _typed_values(contents: bytes, field: str, count: int, where: str, datatype: str) -> Any:
    """The ``field`` values of InferTensorContents wire bytes, walked before they are parsed
    (only the datatype's field, exactly ``count`` elements)."""
    wire.check_contents(contents, field, count, where, datatype)
    try:
        values = getattr(pb.InferTensorContents.FromString(contents), field)
    except Exception:  # protobuf's DecodeError
        raise InvalidInput(f"{where}: contents are not a valid InferTensorContents") from None
    if len(values) != count:  # a value sent with another wire type is an unknown field
        raise InvalidInput(f"{where}: {len(values)} values in {field}, the shape needs {count}")
    return values


def _typed_conversion(
    contents: bytes, datatype: str, shape: list[int], where: str
) -> tuple[int, Callable[[], np.ndarray]]:
    """(the bytes converting typed contents takes at most, the conversion).

    Args:
        contents: the input's InferTensorContents as wire bytes (a staged request's).
    """
    count = math.prod(shape)
    field = CONTENTS_FIELD[datatype]
    if datatype == "BYTES":

        def objects() -> np.ndarray:
            array = np.empty(count, dtype=np.object_)
            array[:] = list(_typed_values(contents, field, count, where, datatype))
            return array.reshape(shape)

        return count * _TYPED_BYTES_ELEMENT_COST + 2 * len(contents), objects
    dtype, wide_dtype = DATATYPES[datatype], _FIELD_DTYPES[field]

    def numbers() -> np.ndarray:
        values = _typed_values(contents, field, count, where, datatype)
        # fromiter: one element at a time; np.array would hold a Python object per element.
        wide = np.fromiter(values, dtype=wide_dtype, count=count)
        if dtype.kind in "iu" and dtype.itemsize < wide.dtype.itemsize and count:
            info = np.iinfo(dtype)
            if wide.min() < info.min or wide.max() > info.max:
                raise InvalidInput(f"{where}: values out of range for {datatype}")
        return wide.astype(dtype, copy=False).reshape(shape)

    # protobuf's array (which may have doubled), numpy's copy of it, the narrowed array.
    return len(contents) + count * (3 * wide_dtype.itemsize + dtype.itemsize), numbers


def _class_count(output: Any, where: str) -> int:
    """Triton's ``classification`` output parameter (tritonclient's ``class_count``); 0: off."""
    if "classification" not in output.parameters:
        return 0
    value = _parameter_value(output.parameters["classification"])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{where}: parameters['classification'] must be a positive integer")
    return value


def _requested_outputs(request: Any) -> tuple[list[str], dict[str, int]]:
    """Requested output names (each once) and their class counts, checked before any input."""
    names: list[str] = []
    class_counts: dict[str, int] = {}
    for index, output in enumerate(request.outputs):
        where = f"outputs[{index}] ({shown(output.name)})"
        if output.name in class_counts:
            raise InvalidInput(f"{where}: output requested more than once")
        class_counts[output.name] = _class_count(output, where)
        names.append(output.name)
    return names, {name: k for name, k in class_counts.items() if k}


def _check_inputs(request: Any) -> list[list[int]]:
    """Names, datatypes, shapes and raw byte lengths, before any tensor is materialised."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    names: set[str] = set()
    shapes = []
    for index, tensor in enumerate(request.inputs):
        where = f"inputs[{index}] ({shown(tensor.name)})"
        if tensor.name in names:
            raise InvalidInput(f"{where}: duplicate input name")
        names.add(tensor.name)
        if tensor.datatype not in DATATYPES:
            raise InvalidInput(f"{where}: unknown datatype {shown(tensor.datatype)}")
        shape = list(tensor.shape)
        count = element_count(shape, where)
        if raw and tensor.contents:
            raise InvalidInput(f"{where}: sets contents while the request uses raw_input_contents")
        if raw and tensor.datatype != "BYTES":
            expected = count * DATATYPES[tensor.datatype].itemsize
            if len(raw[index]) != expected:
                raise InvalidInput(
                    f"{where}: raw contents are {len(raw[index])} bytes, shape {shape} of "
                    f"{tensor.datatype} needs {expected}"
                )
        if not raw and tensor.datatype not in CONTENTS_FIELD:
            raise InvalidInput(
                f"{where}: datatype {tensor.datatype} can only be sent as raw contents"
            )
        shapes.append(shape)
    return shapes


def stage_infer_request(request: Any) -> StagedInferRequest:
    """Check the wire format and stage each input, converting none of them; the handler
    converts them once the model has accepted their headers.

    Every check that needs no tensor runs here: requested outputs, names, datatypes, shapes
    (rank, negative and oversized dimensions), raw byte lengths, raw and typed mixed.

    Args:
        request: a ModelInferRequest from ``wire.parse_staged_infer_request``, whose inputs'
            ``contents`` are still wire bytes.
    """
    requested, class_counts = _requested_outputs(request)
    shapes = _check_inputs(request)
    raw = request.raw_input_contents
    inputs = []
    for index, (tensor, shape) in enumerate(zip(request.inputs, shapes, strict=True)):
        where = f"inputs[{index}] ({shown(tensor.name)})"
        if raw:
            cost, conversion = raw_conversion(raw[index], tensor.datatype, shape, where)
        else:
            cost, conversion = _typed_conversion(tensor.contents, tensor.datatype, shape, where)
        inputs.append(StagedTensor(tensor.name, tensor.datatype, tuple(shape), cost, conversion))
    return StagedInferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        inputs=inputs,
        requested_outputs=requested,
        parameters=parameters_from_proto(request.parameters),
        class_counts=class_counts,
    )


def infer_response_to_proto(response: InferResponse, *, raw: bool) -> pb.ModelInferResponse:
    """Outputs as raw_output_contents when the request used raw inputs, else typed contents."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor in response.outputs:
        output = message.outputs.add(name=tensor.name, datatype=tensor.datatype)
        output.shape.extend(tensor.shape)
        if tensor.datatype == "BYTES":
            data = serialize_bytes(tensor.data.reshape(-1))
            if raw:
                message.raw_output_contents.append(data)
            else:
                output.contents.bytes_contents.extend(bytes(x) for x in tensor.data.reshape(-1))
        elif raw or tensor.datatype not in CONTENTS_FIELD:
            dtype = DATATYPES[tensor.datatype]
            message.raw_output_contents.append(
                np.ascontiguousarray(tensor.data, dtype=dtype).tobytes()
            )
        else:
            values = getattr(output.contents, CONTENTS_FIELD[tensor.datatype])
            values.extend(tensor.data.reshape(-1).tolist())
    return message


def model_metadata_to_proto(info: ModelInfo) -> pb.ModelMetadataResponse:
    message = pb.ModelMetadataResponse(
        name=info.name, versions=info.versions, platform=info.platform
    )
    for target, tensors in ((message.inputs, info.inputs), (message.outputs, info.outputs)):
        for tensor in tensors:
            target.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    message.properties.update(info.properties)
    return message


def classify_request_from_proto(
    request: classifier_pb2.ClassifyRequest, max_images: int
) -> ClassifyRequest:
    """The plain request; the images are counted before they are copied."""
    if not request.images:
        raise InvalidInput("images: at least one image is required")
    if len(request.images) > max_images:
        raise InvalidInput(
            f"images: {len(request.images)} images; the limit (max_images_per_request) is "
            f"{max_images}"
        )
    threshold = None
    if request.HasField("abstention_threshold"):
        threshold = request.abstention_threshold
        if not 0.0 <= threshold <= 1.0:
            raise InvalidInput(f"abstention_threshold {threshold} is not in [0, 1]")
    return ClassifyRequest(
        images=list(request.images),
        top_k=request.top_k or 1,
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        abstention_threshold=threshold,
    )


def classify_response_to_proto(response: ClassifyResponse) -> classifier_pb2.ClassifyResponse:
    message = classifier_pb2.ClassifyResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for classification in response.results:
        result = message.results.add(
            abstained=classification.abstained,
            abstention_threshold=classification.abstention_threshold,
        )
        for prediction in classification.predictions:
            result.predictions.add(
                label=prediction.label, index=prediction.index, score=prediction.score
            )
    return message


def _duration(target: pb.StatisticDuration, count: int, ns: int) -> None:
    target.count = count
    target.ns = ns


def statistics_to_proto(versions: list[VersionStatistics]) -> pb.ModelStatisticsResponse:
    """Triton's ModelStatistics for loaded versions."""
    message = pb.ModelStatisticsResponse()
    for version in versions:
        stats = version.stats
        entry = message.model_stats.add(
            name=version.name,
            version=version.version,
            last_inference=stats.last_inference_ms,
            inference_count=stats.inference_count,
            execution_count=stats.execution_count,
        )
        inference = entry.inference_stats
        for name in (
            "success",
            "fail",
            "queue",
            "compute_input",
            "compute_infer",
            "compute_output",
        ):
            duration = getattr(stats, name)
            _duration(getattr(inference, name), duration.count, duration.ns)
    return message


def repository_index_to_proto(index: list[VersionState]) -> pb.RepositoryIndexResponse:
    """Triton's RepositoryIndex answer: one entry per model version."""
    message = pb.RepositoryIndexResponse()
    for entry in index:
        message.models.add(
            name=entry.model, version=entry.version, state=entry.state, reason=entry.reason
        )
    return message
