"""Plain request and response types shared by the converters and the handlers.

Nothing here knows about protobuf or gRPC: the transport converts messages into these, the
handlers work on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tensor:
    """A named array and its OIP datatype (``contracts.oip_datatypes``)."""

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
    # Requested output -> k, for Triton's classification extension (top-k "score:index:label").
    class_counts: dict[str, int] = field(default_factory=dict)


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
    # None: the version's own threshold; 0: never abstain.
    abstention_threshold: float | None = None
    # Marked by a load test (contracts.load_test): kept out of the production metrics.
    is_load_test: bool = False
    # Who asked (the peer's address, without its port): captures are rate-limited per client.
    client: str = ""


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Classification:
    """One image's answer: its top-k predictions, and whether the model abstained."""

    predictions: list[Prediction]
    abstained: bool = False
    abstention_threshold: float = 0.0


@dataclass(frozen=True)
class ClassifyResponse:
    results: list[Classification]
    model_name: str
    model_version: str
    id: str
