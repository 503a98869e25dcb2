"""The task-level classification handler: encoded images in, top-k labels out."""

from __future__ import annotations

import random
import time

import numpy as np

from server.capture import Capture, CaptureWriter, capture_reason
from server.class_scores import class_probabilities, top_k_indices
from server.decode_pool import DecodePool
from server.errors import InvalidInput
from server.handlers.common import RequestRecord, check_model_reference, recorded
from server.metrics import ServerMetrics
from server.model_manager import ModelManager
from server.model_version import ModelVersion
from server.prediction_monitor import PredictionMonitors
from server.preprocess import ImageLimits
from server.types import (
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    Prediction,
    Tensor,
)


def top_k(probabilities: np.ndarray, labels: tuple[str, ...], k: int) -> list[list[Prediction]]:
    """The k best classes per row, highest first; labels fall back to the class index."""
    return [
        [
            Prediction(labels[i] if i < len(labels) else str(i), int(i), float(row[i]))
            for i in top_k_indices(row, k)
        ]
        for row in probabilities
    ]


class ClassificationHandler:
    """Decodes images per the model's export metadata and runs them through its batcher."""

    def __init__(  # noqa: PLR0913  the composition root hands each collaborator in explicitly
        self,
        manager: ModelManager,
        metrics: ServerMetrics,
        decoder: DecodePool,
        limits: ImageLimits,
        max_images: int,
        monitors: PredictionMonitors,
        capture: CaptureWriter | None = None,
    ) -> None:
        """
        Args:
            decoder: the bounded decode pool.
            limits: what one image may cost to decode.
            max_images: images per request at most (``max_images_per_request``).
            monitors: the production metrics of each served version.
            capture: where uncertain answers are offered for review (None: off).
        """
        self.manager = manager
        self.metrics = metrics
        self.decoder = decoder
        self.limits = limits
        self.max_images = max_images
        self.monitors = monitors
        self.capture = capture

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        record = RequestRecord()
        with recorded(self.metrics, record, request.deadline):
            if len(request.images) > self.max_images:
                raise InvalidInput(
                    f"images: {len(request.images)} images; the limit (max_images_per_request) "
                    f"is {self.max_images}"
                )
            check_model_reference(request.model_name, request.model_version)
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
        probabilities = class_probabilities(outputs, model.outputs[0].name)
        if limit == 0:
            probabilities = probabilities.reshape(1, -1)
        return ClassifyResponse(
            results=self._judge(model, request, probabilities),
            model_name=model.name,
            model_version=model.version_str,
            id=request.id,
        )

    def _judge(
        self, model: ModelVersion, request: ClassifyRequest, probabilities: np.ndarray
    ) -> list[Classification]:
        """Top-k per image, abstained or not; each answer feeds the production metrics and,
        when the model was unsure, the capture for review, unless a load test asked."""
        metadata = model.metadata
        own_threshold = metadata.abstention_threshold if metadata is not None else 0.0
        threshold = request.abstention_threshold
        if threshold is None:
            threshold = own_threshold
        reference = metadata.val_class_counts if metadata is not None else None
        monitor = self.monitors.for_version(model.name, model.version_str, model.labels, reference)
        results = []
        for image, row, predictions in zip(
            request.images, probabilities, top_k(probabilities, model.labels, request.top_k),
            strict=True,
        ):  # fmt: skip
            best = int(np.argmax(row))
            abstained = bool(row[best] < threshold)
            if request.is_load_test:
                monitor.skip_load_test()
            else:
                monitor.observe(best, float(row[best]), abstained)
                if self.capture is not None:
                    # The version's own threshold decides what is kept for review: a client's
                    # threshold changes its answer, never what the server stores.
                    self._offer_capture(model, request, image, row, bool(row[best] < own_threshold))
            results.append(Classification(predictions, abstained, float(threshold)))
        return results

    def _offer_capture(
        self,
        model: ModelVersion,
        request: ClassifyRequest,
        image: bytes,
        row: np.ndarray,
        abstained: bool,
    ) -> None:
        assert self.capture is not None
        reason = capture_reason(row.tolist(), abstained, self.capture.policy, random.random)
        if reason is None:
            return
        labels = [model.labels[i] if i < len(model.labels) else str(i) for i in range(len(row))]
        scores = {label: round(float(p), 6) for label, p in zip(labels, row, strict=True)}
        self.capture.offer(
            Capture(
                image,
                model.name,
                model.version_str,
                scores,
                request.id,
                reason,
                client=request.client,
            )
        )
