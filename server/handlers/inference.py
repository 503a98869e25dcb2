"""Open Inference Protocol handlers: health, metadata, configuration, statistics, the
repository index, inference."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence

import numpy as np

from server.class_scores import top_k_indices
from server.errors import InvalidInput, shown
from server.handlers.byte_budget import ByteBudget
from server.handlers.common import RequestRecord, check_model_reference, recorded
from server.handlers.staged_request import StagedInferRequest, StagedTensor, stage
from server.metrics import ServerMetrics
from server.model_manager import ModelManager
from server.model_spec import ModelSpec
from server.model_version import ModelVersion, check_input
from server.onnx_sessions import TensorSpec
from server.repository import PLATFORM
from server.statistics import VersionStatistics
from server.types import InferRequest, InferResponse, ModelInfo, Tensor, TensorInfo
from server.version_states import VersionState

SERVER_NAME = "finetune-serve"
SERVER_VERSION = "0.1.0"
# "statistics" makes perf_analyzer call ModelStatistics, which this server implements.
EXTENSIONS = ["classification", "model_configuration", "statistics"]
# Inputs that cost more than this to convert are converted on a worker thread, so a 64 MB
# request (typed and BYTES contents convert element by element) never stalls the event loop
# and health with it.
CONVERT_ON_LOOP_BYTES = 256 * 1024


def check_staged_inputs(
    specs: Sequence[TensorSpec], max_batch_size: int, inputs: Sequence[StagedTensor]
) -> None:
    """Names, datatypes and shapes against the graph's inputs, before any is converted.

    Raises:
        InvalidInput: an unknown or missing input (names cut short), or what
            ``check_input`` refuses.
    """
    by_name = {spec.name: spec for spec in specs}
    unknown = [tensor.name for tensor in inputs if tensor.name not in by_name]
    if unknown:
        names = ", ".join(shown(name) for name in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise InvalidInput(f"unknown input(s) {names}{more}; the model takes {sorted(by_name)}")
    missing = sorted(set(by_name) - {tensor.name for tensor in inputs})
    if missing:
        raise InvalidInput(f"missing input(s) {missing}")
    for tensor in inputs:
        check_input(by_name[tensor.name], tensor, max_batch_size)


async def convert(tensor: StagedTensor) -> np.ndarray:
    """The staged input's array; large ones are converted on a worker thread."""
    if tensor.cost_bytes <= CONVERT_ON_LOOP_BYTES:
        return tensor.convert()
    return await asyncio.get_running_loop().run_in_executor(None, tensor.convert)


class InferenceHandler:
    """The OIP data plane on plain types; the transport converts to and from protobuf."""

    def __init__(self, manager: ModelManager, metrics: ServerMetrics, budget: ByteBudget) -> None:
        """
        Args:
            budget: the bytes converted inputs may hold at once (``max_inflight_input_bytes``).
        """
        self.manager = manager
        self.metrics = metrics
        self.budget = budget
        self.is_draining = False

    def is_live(self) -> bool:
        return True

    def is_ready(self) -> bool:
        return self.manager.is_ready and not self.is_draining

    def model_ready(self, name: str, version: str) -> bool:
        if self.is_draining:
            return False
        check_model_reference(name, version)
        self.manager.resolve(name, version)  # raises ModelNotFound for unknown models
        return True

    def server_metadata(self) -> tuple[str, str, list[str]]:
        return SERVER_NAME, SERVER_VERSION, list(EXTENSIONS)

    def model_metadata(self, name: str, version: str) -> ModelInfo:
        check_model_reference(name, version)
        model = self.manager.resolve(name, version)
        properties = {
            "provider": model.sessions.providers[0],
            "labels": json.dumps(list(model.labels)),
        }
        metadata = model.metadata
        if metadata is not None and metadata.preprocessing is not None:
            properties["preprocessing"] = json.dumps(
                {"input_format": metadata.input_format, **metadata.preprocessing.to_dict()}
            )
        return ModelInfo(
            name=model.name,
            versions=[v.version_str for v in self.manager.versions(model.name)],
            platform=PLATFORM,
            inputs=[TensorInfo(s.name, s.datatype, list(s.shape)) for s in model.inputs],
            outputs=[TensorInfo(s.name, s.datatype, list(s.shape)) for s in model.outputs],
            properties=properties,
        )

    def model_config(self, name: str, version: str) -> ModelSpec:
        check_model_reference(name, version)
        spec = self.manager.resolve(name, version).spec
        if not spec.platform and not spec.backend:
            spec = dataclasses.replace(spec, platform=PLATFORM)
        return spec

    def statistics(self, name: str, version: str) -> list[VersionStatistics]:
        check_model_reference(name, version)
        if name:
            if version:
                models = [self.manager.resolve(name, version)]
            else:
                self.manager.resolve(name)
                models = self.manager.versions(name)
        else:
            models = [m for n in self.manager.model_names() for m in self.manager.versions(n)]
        return [VersionStatistics(m.name, m.version_str, m.stats.snapshot()) for m in models]

    def repository_index(self, ready_only: bool) -> list[VersionState]:
        """Triton's RepositoryIndex: each model and version with its state (one repository)."""
        index = self.manager.repository_index()
        return [entry for entry in index if entry.is_ready] if ready_only else index

    async def infer(self, request: StagedInferRequest | InferRequest) -> InferResponse:
        """Check the request against the model, then convert its inputs and compute.

        Raises:
            ModelNotFound, InvalidInput, MessageTooLarge, Overloaded, ...: before any input
                is converted when the model, a name, a datatype, a shape or the byte budget
                refuses it.
        """
        if isinstance(request, InferRequest):
            request = stage(request)
        record = RequestRecord()
        with recorded(self.metrics, record, request.deadline):
            check_model_reference(request.model_name, request.model_version)
            async with self.manager.lease(request.model_name, request.model_version) as model:
                record.model, record.version = model.name, model.version_str
                return await self._infer(model, request, record)

    async def _infer(
        self, model: ModelVersion, request: StagedInferRequest, record: RequestRecord
    ) -> InferResponse:
        outputs = {s.name: s for s in model.outputs}
        for name in request.requested_outputs:
            if name not in outputs:
                raise InvalidInput(f"unknown output {shown(name)}; the model has {sorted(outputs)}")
        for name in request.class_counts:
            if outputs[name].datatype == "BYTES":
                raise InvalidInput(f"output {name!r} is BYTES; classification needs numbers")
        with contextlib.ExitStack() as held:
            try:
                check_staged_inputs(model.inputs, model.max_batch_size, request.inputs)
                held.enter_context(self.budget.reserve(sum(t.cost_bytes for t in request.inputs)))
                inputs = [Tensor(t.name, t.datatype, await convert(t)) for t in request.inputs]
            except BaseException:  # the version's statistics count it, as infer() would
                model.stats.record_failure(time.monotonic() - record.started)
                raise
            values = await model.infer(inputs, request.deadline, record.started)
        names = request.requested_outputs or list(outputs)
        tensors = []
        for name in names:
            k = request.class_counts.get(name, 0)
            if k:
                data = classification(values[name], k, model.labels, model.max_batch_size > 0)
                tensors.append(Tensor(name, "BYTES", data))
            else:
                tensors.append(Tensor(name, outputs[name].datatype, np.asarray(values[name])))
        return InferResponse(
            model_name=model.name, model_version=model.version_str, id=request.id, outputs=tensors
        )


def classification(
    values: np.ndarray, k: int, labels: tuple[str, ...], batched: bool
) -> np.ndarray:
    """Triton's classification extension: the k largest values of each row, as BYTES
    ``"score:index:label"`` (``"score:index"`` for classes without a label), best first.

    Args:
        batched: the first axis is the batch (``max_batch_size > 0``); the result is then
            [batch, k], else [k].
    """
    rows = np.asarray(values).reshape(values.shape[0] if batched else 1, -1)
    k = min(k, rows.shape[1])
    result = np.empty((rows.shape[0], k), dtype=np.object_)
    for r, row in enumerate(rows):
        for j, index in enumerate(top_k_indices(row, k)):
            label = f":{labels[index]}" if index < len(labels) else ""
            result[r, j] = f"{float(row[index]):f}:{index}{label}".encode()
    return result if batched else result[0]
