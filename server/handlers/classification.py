"""The task-level classification handler: encoded images in, top-k labels out."""

from __future__ import annotations

import time

import numpy as np

from server.decode_pool import DecodePool
from server.errors import InvalidInput
from server.handlers.common import RequestRecord, recorded
from server.metrics import ServerMetrics
from server.model_manager import ModelManager
from server.model_version import ModelVersion
from server.preprocess import ImageLimits
from server.types import ClassifyRequest, ClassifyResponse, Prediction, Tensor


def _probabilities(model: ModelVersion, outputs: dict[str, np.ndarray]) -> np.ndarray:
    if "probabilities" in outputs:
        return np.asarray(outputs["probabilities"], dtype=np.float64)
    logits = np.asarray(outputs[model.outputs[0].name], dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, labels: tuple[str, ...], k: int) -> list[list[Prediction]]:
    """The k best classes per row, highest first; labels fall back to the class index."""
    k = min(k, probabilities.shape[1])
    results = []
    for row in probabilities:
        best = np.argsort(-row, kind="stable")[:k]
        results.append(
            [
                Prediction(labels[i] if i < len(labels) else str(i), int(i), float(row[i]))
                for i in best
            ]
        )
    return results


class ClassificationHandler:
    """Decodes images per the model's export metadata and runs them through its batcher."""

    def __init__(
        self,
        manager: ModelManager,
        metrics: ServerMetrics,
        decoder: DecodePool,
        limits: ImageLimits,
        max_images: int,
    ) -> None:
        """
        Args:
            decoder: the bounded decode pool.
            limits: what one image may cost to decode.
            max_images: images per request at most (``max_images_per_request``).
        """
        self.manager = manager
        self.metrics = metrics
        self.decoder = decoder
        self.limits = limits
        self.max_images = max_images

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        record = RequestRecord()
        with recorded(self.metrics, record, request.deadline):
            if len(request.images) > self.max_images:
                raise InvalidInput(
                    f"images: {len(request.images)} images; the limit (max_images_per_request) "
                    f"is {self.max_images}"
                )
            async with self.manager.lease(request.model_name, request.model_version) as model:
                record.model, record.version = model.name, model.version_str
                return await self._classify(model, request, record.started)

    async def _classify(
        self, model: ModelVersion, request: ClassifyRequest, received: float
    ) -> ClassifyResponse:
        if model.metadata is None or model.metadata.preprocessing is None:
            raise InvalidInput(
                f"model {model.name!r} has no preprocessing metadata (model.json); "
                "use ModelInfer with decoded tensors"
            )
        if request.top_k < 1:
            raise InvalidInput("top_k must be >= 1")
        limit = model.max_batch_size
        if limit > 0 and len(request.images) > limit:
            raise InvalidInput(f"images: {len(request.images)} images, the limit is {limit}")
        started = time.monotonic()
        batch = await self.decoder.decode(
            request.images,
            model.metadata.preprocessing,
            model.metadata.input_format,
            self.limits,
        )
        self.metrics.preprocess_seconds.labels(model.name, model.version_str).observe(
            time.monotonic() - started
        )
        if limit == 0:
            if len(request.images) != 1:
                raise InvalidInput("images: this model takes one image per request")
            batch = batch[0]
        image_input = model.inputs[0]
        outputs = await model.infer(
            [Tensor(image_input.name, image_input.datatype, batch)], request.deadline, received
        )
        probabilities = _probabilities(model, outputs)
        if limit == 0:
            probabilities = probabilities.reshape(1, -1)
        return ClassifyResponse(
            results=top_k(probabilities, model.labels, request.top_k),
            model_name=model.name,
            model_version=model.version_str,
            id=request.id,
        )
