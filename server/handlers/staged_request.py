"""A ModelInfer request whose inputs are checked for form but not converted yet.

Converting typed contents is where a request's memory is spent (a 31 MiB message of BYTES
elements becomes 700 MiB of Python objects), so the transport hands the handler each input's
header, what converting it will cost at most, and the conversion itself; the handler runs
the conversion only after the model, the input names, datatypes and shapes and the byte
budget have accepted the request.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.types import InferRequest


@dataclass(frozen=True)
class StagedTensor:
    """One input: its header, the bytes converting it may take at most, and the conversion.

    ``convert`` raises InvalidInput when the contents do not match the header.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    cost_bytes: int
    convert: Callable[[], np.ndarray]


@dataclass(frozen=True)
class StagedInferRequest:
    """``server.types.InferRequest`` with staged inputs."""

    model_name: str
    model_version: str
    id: str
    inputs: list[StagedTensor]
    # Empty: every output.
    requested_outputs: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)
    # Absolute time.monotonic() deadline, from the RPC deadline.
    deadline: float | None = None
    # Requested output -> k, for Triton's classification extension (top-k "score:index:label").
    class_counts: dict[str, int] = field(default_factory=dict)


def _same(array: np.ndarray) -> np.ndarray:
    return array


def stage(request: InferRequest) -> StagedInferRequest:
    """An already converted request as a staged one (a transport that converts as it parses)."""
    return StagedInferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        inputs=[
            StagedTensor(
                t.name, t.datatype, t.shape, t.data.nbytes, functools.partial(_same, t.data)
            )
            for t in request.inputs
        ],
        requested_outputs=request.requested_outputs,
        parameters=request.parameters,
        deadline=request.deadline,
        class_counts=request.class_counts,
    )
