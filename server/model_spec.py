"""A model's configuration as plain data: what ``config.pbtxt`` says, without protobuf.

``server.transport.model_config`` reads Triton's text format into a ``ModelSpec`` and writes a
``ModelSpec`` back as the ``ModelConfig`` message; everything else (the repository reader, the
model manager, the handlers, the batcher) sees only these frozen dataclasses.

A version's graph is the truth about its tensors: ``graph_contradictions`` lists where
config.pbtxt says otherwise (the version is then refused, so ``ModelConfig`` can never report
one thing while ``ModelMetadata`` and the requests see another), and ``complete_from_graph``
fills in what config.pbtxt leaves unstated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from contracts.oip_datatypes import DATATYPE_TO_CONFIG_TYPE


@dataclass(frozen=True)
class TensorConfig:
    """One ``input`` or ``output`` entry.

    Attributes:
        datatype: the OIP datatype (``FP32``, ``BYTES``, ...), not Triton's ``TYPE_*`` name;
            empty when config.pbtxt leaves it to the ONNX graph.
        dims: the shape without the batch dimension when ``max_batch_size > 0``; -1 = variable.
        format: an input's ``FORMAT_*`` name (``FORMAT_NONE`` when unset).
        label_filename: an output's label file, relative to the model directory.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]
    format: str = "FORMAT_NONE"
    label_filename: str = ""


@dataclass(frozen=True)
class DynamicBatchingConfig:
    """The ``dynamic_batching`` block (only the fields this server acts on or reports)."""

    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    preserve_ordering: bool = False
    # From default_queue_policy; 0 = unbounded (the server's own limit applies).
    max_queue_size: int = 0


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk to serve: ``latest`` N, ``all``, or ``specific`` ones."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions this policy serves, ascending, out of those on disk."""
        available = sorted(available)
        if self.kind == "all":
            return available
        if self.kind == "specific":
            wanted = set(self.versions)
            return [v for v in available if v in wanted]
        return available[-max(self.num_versions, 1) :]


@dataclass(frozen=True)
class ModelSpec:
    """A model's configuration (``config.pbtxt``), resolved and validated."""

    name: str
    platform: str = ""
    backend: str = ""
    # 0: the model has no batch dimension.
    max_batch_size: int = 0
    inputs: tuple[TensorConfig, ...] = ()
    outputs: tuple[TensorConfig, ...] = ()
    # None: no dynamic_batching block, so requests run one at a time.
    dynamic_batching: DynamicBatchingConfig | None = None
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)

    @property
    def label_filenames(self) -> tuple[str, ...]:
        """The outputs' label files, in output order."""
        return tuple(o.label_filename for o in self.outputs if o.label_filename)


class TensorHeader(Protocol):
    """A tensor's name, datatype and shape without its values: a graph input or output as the
    sessions describe it (the batch dimension included), a request's tensor, or a staged input
    not converted yet."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def _type_name(datatype: str) -> str:
    return DATATYPE_TO_CONFIG_TYPE.get(datatype, datatype)


def _dims(spec: ModelSpec, tensor: TensorHeader) -> tuple[int, ...]:
    """The graph's shape as config.pbtxt writes it: without the batch dimension when batching."""
    return tensor.shape[1:] if spec.max_batch_size > 0 else tensor.shape


def _dims_agree(stated: tuple[int, ...], graph: tuple[int, ...]) -> bool:
    # -1 on either side is a variable dimension: config.pbtxt may narrow or widen it.
    return len(stated) == len(graph) and all(
        s == g or s < 0 or g < 0 for s, g in zip(stated, graph, strict=True)
    )


def _batch_contradiction(spec: ModelSpec, inputs: Sequence[TensorHeader]) -> list[str]:
    # The inputs decide the batches a graph takes; an output's shape is only what onnxruntime's
    # shape inference derived, and a graph that computes wrong shapes fails its warm-up.
    if spec.max_batch_size <= 0:
        return []
    for tensor in inputs:
        if not tensor.shape:
            return [
                f"max_batch_size {spec.max_batch_size} in config.pbtxt, but the graph's input "
                f"{tensor.name!r} has no dimension to batch"
            ]
        if 0 <= tensor.shape[0] < spec.max_batch_size:
            return [
                f"max_batch_size {spec.max_batch_size} in config.pbtxt, {tensor.shape[0]} in the "
                f"graph (input {tensor.name!r} has a fixed batch dimension)"
            ]
    return []


def _tensor_contradictions(
    spec: ModelSpec, kind: str, stated: TensorConfig, tensor: TensorHeader
) -> list[str]:
    found = []
    where = f"{kind} {stated.name!r}"
    if stated.datatype and stated.datatype != tensor.datatype:
        found.append(
            f"{where} data_type {_type_name(stated.datatype)} in config.pbtxt, "
            f"{_type_name(tensor.datatype)} in the graph"
        )
    graph_dims = _dims(spec, tensor)
    if not _dims_agree(stated.dims, graph_dims):
        batch = " after the batch dimension" if spec.max_batch_size > 0 else ""
        found.append(
            f"{where} dims {list(stated.dims)} in config.pbtxt, {list(graph_dims)} in the "
            f"graph{batch}"
        )
    return found


def graph_contradictions(
    spec: ModelSpec, inputs: Sequence[TensorHeader], outputs: Sequence[TensorHeader]
) -> list[str]:
    """Where config.pbtxt contradicts the graph: one phrase each, naming the field and both
    values (config.pbtxt's first, then the graph's).

    As in Triton, a config that lists inputs lists every graph input; listed outputs must be
    outputs of the graph (the graph may have more); an unstated ``data_type`` and a ``-1``
    dimension agree with anything; ``max_batch_size`` may not exceed an input's fixed batch
    dimension.
    """
    graph = {"input": {t.name: t for t in inputs}, "output": {t.name: t for t in outputs}}
    found = _batch_contradiction(spec, inputs)
    for kind, stated_tensors in (("input", spec.inputs), ("output", spec.outputs)):
        for stated in stated_tensors:
            tensor = graph[kind].get(stated.name)
            if tensor is None:
                found.append(
                    f"{kind} {stated.name!r} in config.pbtxt, not in the graph (its {kind}s: "
                    f"{', '.join(graph[kind]) or 'none'})"
                )
            else:
                found += _tensor_contradictions(spec, kind, stated, tensor)
    stated_inputs = {t.name for t in spec.inputs}
    unstated = [name for name in graph["input"] if name not in stated_inputs]
    if spec.inputs and unstated:
        found.append(
            f"inputs {', '.join(sorted(stated_inputs))} in config.pbtxt, the graph also takes "
            f"{', '.join(unstated)}"
        )
    return found


def complete_from_graph(
    spec: ModelSpec, inputs: Sequence[TensorHeader], outputs: Sequence[TensorHeader]
) -> ModelSpec:
    """``spec`` with what config.pbtxt leaves unstated taken from the graph: each tensor's
    ``data_type``, and every input (output) when it lists none, so ``ModelConfig`` reports
    what the version serves. Call after ``graph_contradictions`` found nothing."""
    by_name = {t.name: t for t in (*inputs, *outputs)}

    def completed(stated: TensorConfig) -> TensorConfig:
        if stated.datatype:
            return stated
        return dataclasses.replace(stated, datatype=by_name[stated.name].datatype)

    def listed(tensors: Sequence[TensorHeader]) -> tuple[TensorConfig, ...]:
        return tuple(TensorConfig(t.name, t.datatype, _dims(spec, t)) for t in tensors)

    return dataclasses.replace(
        spec,
        inputs=tuple(completed(t) for t in spec.inputs) or listed(inputs),
        outputs=tuple(completed(t) for t in spec.outputs) or listed(outputs),
    )
