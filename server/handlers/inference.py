"""Open Inference Protocol handlers: health, metadata, configuration, statistics, inference."""

from __future__ import annotations

import json
import time

import numpy as np

from server._proto.inference import model_config_pb2
from server.errors import InvalidInput
from server.handlers.common import RequestRecord, recorded
from server.metrics import ServerMetrics
from server.models import LoadedModel, ModelManager
from server.runtime import TensorSpec
from server.types import InferRequest, InferResponse, ModelInfo, Tensor, TensorInfo

SERVER_NAME = "finetune-serve"
SERVER_VERSION = "0.1.0"
# "statistics" makes perf_analyzer call ModelStatistics, which this server implements.
EXTENSIONS = ["classification", "model_configuration", "statistics"]
PLATFORM = "onnxruntime_onnx"


def _check_input(model: LoadedModel, spec: TensorSpec, tensor: Tensor) -> None:
    where = f"input {tensor.name!r}"
    if tensor.datatype != spec.datatype:
        raise InvalidInput(
            f"{where}: datatype {tensor.datatype}, the model expects {spec.datatype}"
        )
    shape = tensor.shape
    if len(shape) != len(spec.shape):
        raise InvalidInput(f"{where}: shape {list(shape)}, the model expects {list(spec.shape)}")
    dims = zip(shape, spec.shape, strict=True)
    if model.max_batch_size > 0:
        if not 1 <= shape[0] <= model.max_batch_size:
            raise InvalidInput(f"{where}: batch size {shape[0]} outside 1..{model.max_batch_size}")
        dims = zip(shape[1:], spec.shape[1:], strict=True)
    for got, want in dims:
        if want >= 0 and got != want:
            raise InvalidInput(
                f"{where}: shape {list(shape)}, the model expects {list(spec.shape)}"
            )


class InferenceHandler:
    """The OIP data plane on plain types; the transport converts to and from protobuf."""

    def __init__(self, manager: ModelManager, metrics: ServerMetrics) -> None:
        self.manager = manager
        self.metrics = metrics
        self.is_draining = False

    def is_live(self) -> bool:
        return True

    def is_ready(self) -> bool:
        return self.manager.is_ready and not self.is_draining

    def model_ready(self, name: str, version: str) -> bool:
        if self.is_draining:
            return False
        self.manager.resolve(name, version)  # raises ModelNotFound for unknown models
        return True

    def server_metadata(self) -> tuple[str, str, list[str]]:
        return SERVER_NAME, SERVER_VERSION, list(EXTENSIONS)

    def model_metadata(self, name: str, version: str) -> ModelInfo:
        model = self.manager.resolve(name, version)
        runtime = model.runtime
        properties = {"provider": runtime.providers[0], "labels": json.dumps(list(model.labels))}
        if model.metadata is not None and model.metadata.preprocessing is not None:
            pre = model.metadata.preprocessing
            properties["preprocessing"] = json.dumps(
                {
                    "input_format": pre.input_format,
                    "input_size": list(pre.input_size),
                    "resize_size": pre.resize_size,
                    "mean": list(pre.mean),
                    "std": list(pre.std),
                }
            )
        return ModelInfo(
            name=model.name,
            versions=[v.version_str for v in self.manager.versions(model.name)],
            platform=PLATFORM,
            inputs=[TensorInfo(s.name, s.datatype, list(s.shape)) for s in runtime.inputs],
            outputs=[TensorInfo(s.name, s.datatype, list(s.shape)) for s in runtime.outputs],
            properties=properties,
        )

    def model_config(self, name: str, version: str) -> model_config_pb2.ModelConfig:
        model = self.manager.resolve(name, version)
        config = model_config_pb2.ModelConfig()
        config.CopyFrom(model.config)
        if not config.platform and not config.backend:
            config.platform = PLATFORM
        return config

    def statistics(self, name: str, version: str) -> list[LoadedModel]:
        if name:
            if version:
                return [self.manager.resolve(name, version)]
            self.manager.resolve(name)
            return self.manager.versions(name)
        return [m for n in self.manager.model_names() for m in self.manager.versions(n)]

    async def infer(self, request: InferRequest) -> InferResponse:
        record = RequestRecord()
        with recorded(self.metrics, record, request.deadline):
            async with self.manager.lease(request.model_name, request.model_version) as model:
                record.model, record.version = model.name, model.version_str
                return await self._infer(model, request, record)

    async def _infer(
        self, model: LoadedModel, request: InferRequest, record: RequestRecord
    ) -> InferResponse:
        specs = {s.name: s for s in model.runtime.inputs}
        given = {t.name: t for t in request.inputs}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise InvalidInput(f"unknown input(s) {unknown}; the model takes {sorted(specs)}")
        missing = sorted(set(specs) - set(given))
        if missing:
            raise InvalidInput(f"missing input(s) {missing}")
        for name, tensor in given.items():
            _check_input(model, specs[name], tensor)
        outputs = {s.name: s for s in model.runtime.outputs}
        for name in request.requested_outputs:
            if name not in outputs:
                raise InvalidInput(f"unknown output {name!r}; the model has {sorted(outputs)}")
        inputs = {name: tensor.data for name, tensor in given.items()}
        result = await model.batcher.submit(inputs, request.deadline)
        self._count(model, record, result.queue_s, result.compute_s, inputs)
        names = request.requested_outputs or list(outputs)
        return InferResponse(
            model_name=model.name,
            model_version=model.version_str,
            id=request.id,
            outputs=[Tensor(n, outputs[n].datatype, np.asarray(result.outputs[n])) for n in names],
        )

    def _count(
        self,
        model: LoadedModel,
        record: RequestRecord,
        queue_s: float,
        compute_s: float,
        inputs: dict[str, np.ndarray],
    ) -> None:
        rows = next(iter(inputs.values())).shape[0] if model.max_batch_size > 0 else 1
        self.metrics.queue_seconds.labels(model.name, model.version_str).observe(queue_s)
        stats = model.stats
        stats.success.add(time.monotonic() - record.started)
        stats.queue.add(queue_s)
        stats.compute_infer.add(compute_s)
        stats.inference_count += rows
        stats.last_inference_ms = int(time.time() * 1000)
