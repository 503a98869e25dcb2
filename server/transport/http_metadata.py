"""Triton's REST answers besides inference: server and model metadata, the model
configuration, statistics and the repository index, as JSON.

The configuration and statistics are the gRPC answers' messages (``model_config_to_proto``,
``converters.statistics_to_proto``) in Triton's JSON form, so the two transports cannot
drift apart.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from server.errors import InvalidInput
from server.model_spec import ModelSpec
from server.statistics import VersionStatistics
from server.transport.converters import statistics_to_proto
from server.transport.http_converters import parse_json
from server.transport.model_config import model_config_to_proto
from server.types import ModelInfo
from server.version_states import VersionState

_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def model_metadata_to_json(info: ModelInfo) -> dict[str, Any]:
    """KServe v2 model metadata; ``properties`` as the gRPC answer's (labels, preprocessing)."""
    return {
        "name": info.name,
        "versions": list(info.versions),
        "platform": info.platform,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in info.inputs],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in info.outputs
        ],
        "properties": dict(info.properties),
    }


def server_metadata_to_json(name: str, version: str, extensions: list[str]) -> dict[str, Any]:
    return {"name": name, "version": version, "extensions": list(extensions)}


def _numbers(value: dict[str, Any], descriptor: Any) -> None:
    """64-bit integers as JSON numbers, as Triton writes them (protobuf's JSON uses strings)."""
    for spec in descriptor.fields:
        if spec.name not in value:
            continue
        item = value[spec.name]
        message = spec.message_type
        if message is not None and message.GetOptions().map_entry:
            entry = message.fields_by_name["value"]
            if entry.message_type is not None:
                for member in item.values():
                    _numbers(member, entry.message_type)
            elif entry.type in _INT64_TYPES:
                value[spec.name] = {k: int(v) for k, v in item.items()}
        elif message is not None:
            for member in item if isinstance(item, list) else [item]:
                _numbers(member, message)
        elif spec.type in _INT64_TYPES:
            value[spec.name] = [int(v) for v in item] if isinstance(item, list) else int(item)


def proto_to_json(message: Message) -> dict[str, Any]:
    """Triton's JSON form of a message: field names as in the .proto, every field printed."""
    value = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(value, message.DESCRIPTOR)
    return value


def model_config_to_json(spec: ModelSpec) -> dict[str, Any]:
    """Triton's ``GET .../config``: the ModelConfig message the gRPC answer carries, as JSON."""
    return proto_to_json(model_config_to_proto(spec))


def statistics_to_json(versions: list[VersionStatistics]) -> dict[str, Any]:
    """Triton's ``GET .../stats``: the ModelStatistics answer, as JSON."""
    return proto_to_json(statistics_to_proto(versions))


def repository_index_to_json(index: list[VersionState]) -> list[dict[str, str]]:
    """Triton's ``POST /v2/repository/index``: a JSON array, one entry per model version."""
    return [
        {"name": e.model, "version": e.version, "state": e.state, "reason": e.reason} for e in index
    ]


def repository_index_ready_only(body: bytes) -> bool:
    """The optional ``{"ready": bool}`` of a repository index request (empty: false)."""
    if not body.strip():
        return False
    ready = parse_json(body).get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput("ready: expected a boolean")
    return ready
