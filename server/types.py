"""Plain request and response types shared by the converters and the handlers.

Nothing here knows about protobuf or gRPC: the transport converts messages into these, the
handlers work on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)


@dataclass(frozen=True)
class InferRequest:
    model_name: str
    model_version: str
    id: str
    inputs: list[Tensor]
    # Empty: every output.
    requested_outputs: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)
    # Absolute time.monotonic() deadline, from the RPC deadline.
    deadline: float | None = None


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelInfo:
    """What ModelMetadata reports."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    properties: dict[str, str]


@dataclass(frozen=True)
class ClassifyRequest:
    images: list[bytes]
    top_k: int
    model_name: str
    model_version: str
    id: str
    deadline: float | None = None


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class ClassifyResponse:
    results: list[list[Prediction]]
    model_name: str
    model_version: str
    id: str
