"""Python clients of the inference server: a blocking one and an asyncio one, same methods.

Both speak three services on the one port: ``finetune.v1.Classifier`` (encoded images in, top-k
labels out), the Open Inference Protocol's ``ModelInfer`` (numpy in and out, raw contents) and
``grpc.health.v1``. Failed calls raise :class:`RequestError` carrying the gRPC status code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.connection import (
    ConnectionOptions,
    create_aio_channel,
    create_channel,
    resolve_options,
)
from client.tensors import build_infer_request, parse_infer_response
from protocol.finetune.v1 import classifier_pb2, classifier_pb2_grpc
from protocol.inference import grpc_service_pb2 as oip_pb2
from protocol.inference import grpc_service_pb2_grpc as oip_grpc


class RequestError(Exception):
    """A call the server (or the channel) refused.

    Attributes:
        code: the gRPC status code.
        details: the server's message.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> RequestError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One label of a classification, highest score first within an image."""

    label: str
    index: int
    score: float


@dataclasses.dataclass(frozen=True)
class ImageResult:
    """One image's answer: its predictions, whether the model abstained (was unsure), and the
    model version that answered."""

    predictions: tuple[Prediction, ...]
    abstained: bool
    abstention_threshold: float
    model_name: str = ""
    model_version: str = ""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What ModelMetadata says about a model; ``-1`` in a shape is a variable dimension."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    properties: dict[str, str]


def _classify_request(
    images: Sequence[bytes],
    top_k: int,
    model_name: str,
    model_version: str,
    abstention_threshold: float | None = None,
) -> classifier_pb2.ClassifyRequest:
    if not images:
        raise ValueError("classify needs at least one image")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    request = classifier_pb2.ClassifyRequest(
        images=list(images), top_k=top_k, model_name=model_name, model_version=model_version
    )
    if abstention_threshold is not None:
        request.abstention_threshold = abstention_threshold
    return request


def _image_results(response: classifier_pb2.ClassifyResponse) -> list[ImageResult]:
    return [
        ImageResult(
            predictions=tuple(
                Prediction(label=p.label, index=p.index, score=p.score) for p in result.predictions
            ),
            abstained=result.abstained,
            abstention_threshold=result.abstention_threshold,
            model_name=response.model_name,
            model_version=response.model_version,
        )
        for result in response.results
    ]


def _predictions(response: classifier_pb2.ClassifyResponse) -> list[list[Prediction]]:
    return [list(result.predictions) for result in _image_results(response)]


def _model_info(response: oip_pb2.ModelMetadataResponse) -> ModelInfo:
    def specs(tensors: Any) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors)

    return ModelInfo(
        name=response.name,
        versions=tuple(response.versions),
        platform=response.platform,
        inputs=specs(response.inputs),
        outputs=specs(response.outputs),
        properties=dict(response.properties),
    )


def _status_name(response: health_pb2.HealthCheckResponse) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class InferenceClient:
    """Blocking client. Use as a context manager, or call :meth:`close`.

    ``InferenceClient("localhost:8001")`` or ``InferenceClient("host:443", tls=True,
    token=...)``, as with tritonclient; or ``InferenceClient(ConnectionOptions(...))``.
    """

    def __init__(self, options: ConnectionOptions | str, **connection: Any) -> None:
        options = resolve_options(options, **connection)
        self.options = options
        self._channel = create_channel(options)
        self._classifier = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._oip = oip_grpc.GRPCInferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(
                request, timeout=self.options.timeout_s, metadata=self.options.call_metadata()
            )
        except grpc.RpcError as exc:
            raise RequestError.from_rpc_error(exc) from None

    def classify(
        self,
        images: Sequence[bytes],
        top_k: int = 1,
        *,
        model_name: str = "",
        model_version: str = "",
    ) -> list[list[Prediction]]:
        """Top-k predictions for each encoded image (JPEG, PNG, WebP), in input order."""
        request = _classify_request(images, top_k, model_name, model_version)
        return _predictions(self._call(self._classifier.Classify, request))

    def classify_images(
        self,
        images: Sequence[bytes],
        top_k: int = 1,
        *,
        model_name: str = "",
        model_version: str = "",
        abstention_threshold: float | None = None,
    ) -> list[ImageResult]:
        """Like ``classify``, with whether the model abstained on each image.

        ``abstention_threshold`` overrides the version's own (0 never abstains).
        """
        request = _classify_request(images, top_k, model_name, model_version, abstention_threshold)
        return _image_results(self._call(self._classifier.Classify, request))

    def infer(
        self,
        model_name: str,
        inputs: dict[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        model_version: str = "",
    ) -> dict[str, np.ndarray]:
        """Runs the model on named arrays (batch dimension first); returns outputs by name.

        ``outputs`` restricts the answer to the named outputs; empty means all of them.
        """
        request = build_infer_request(
            model_name, inputs, outputs=outputs, model_version=model_version
        )
        return parse_infer_response(self._call(self._oip.ModelInfer, request))

    def model_metadata(self, model_name: str, model_version: str = "") -> ModelInfo:
        request = oip_pb2.ModelMetadataRequest(name=model_name, version=model_version)
        return _model_info(self._call(self._oip.ModelMetadata, request))

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name (``SERVING``, ``NOT_SERVING``...) of ``service``."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _status_name(self._call(self._health.Check, request))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        self.close()


class AsyncInferenceClient:
    """asyncio client; create it inside the running event loop that will use it.

    Takes ``"HOST:PORT"`` and keywords, or ``ConnectionOptions``, like ``InferenceClient``.
    """

    def __init__(self, options: ConnectionOptions | str, **connection: Any) -> None:
        options = resolve_options(options, **connection)
        self.options = options
        self.channel = create_aio_channel(options)
        self._classifier = classifier_pb2_grpc.ClassifierStub(self.channel)
        self._oip = oip_grpc.GRPCInferenceServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(
                request, timeout=self.options.timeout_s, metadata=self.options.call_metadata()
            )
        except grpc.RpcError as exc:
            raise RequestError.from_rpc_error(exc) from None

    async def classify(
        self,
        images: Sequence[bytes],
        top_k: int = 1,
        *,
        model_name: str = "",
        model_version: str = "",
    ) -> list[list[Prediction]]:
        """Top-k predictions for each encoded image (JPEG, PNG, WebP), in input order."""
        request = _classify_request(images, top_k, model_name, model_version)
        return _predictions(await self._call(self._classifier.Classify, request))

    async def classify_images(
        self,
        images: Sequence[bytes],
        top_k: int = 1,
        *,
        model_name: str = "",
        model_version: str = "",
        abstention_threshold: float | None = None,
    ) -> list[ImageResult]:
        """Like ``classify``, with whether the model abstained on each image.

        ``abstention_threshold`` overrides the version's own (0 never abstains).
        """
        request = _classify_request(images, top_k, model_name, model_version, abstention_threshold)
        return _image_results(await self._call(self._classifier.Classify, request))

    async def classify_stream(
        self,
        batches: AsyncIterable[Sequence[bytes]],
        top_k: int = 1,
        *,
        model_name: str = "",
        model_version: str = "",
    ) -> AsyncIterator[list[list[Prediction]]]:
        """Classifies each batch of encoded images sent on one bidirectional stream.

        Yields one result per batch, in order; a request the server refuses ends the stream
        with :class:`RequestError`.
        """

        async def requests() -> AsyncIterator[classifier_pb2.ClassifyRequest]:
            async for images in batches:
                yield _classify_request(images, top_k, model_name, model_version)

        call = self._classifier.ClassifyStream(
            requests(), timeout=self.options.timeout_s, metadata=self.options.call_metadata()
        )
        try:
            async for response in call:
                yield _predictions(response)
        except grpc.RpcError as exc:
            raise RequestError.from_rpc_error(exc) from None

    async def infer(
        self,
        model_name: str,
        inputs: dict[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        model_version: str = "",
    ) -> dict[str, np.ndarray]:
        """Runs the model on named arrays (batch dimension first); returns outputs by name."""
        request = build_infer_request(
            model_name, inputs, outputs=outputs, model_version=model_version
        )
        return parse_infer_response(await self._call(self._oip.ModelInfer, request))

    async def model_metadata(self, model_name: str, model_version: str = "") -> ModelInfo:
        request = oip_pb2.ModelMetadataRequest(name=model_name, version=model_version)
        return _model_info(await self._call(self._oip.ModelMetadata, request))

    async def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name (``SERVING``, ``NOT_SERVING``...) of ``service``."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _status_name(await self._call(self._health.Check, request))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        await self.close()
