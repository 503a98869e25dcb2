"""Client library of the inference server: no onnxruntime, no torch.

``InferenceClient`` (blocking) and ``AsyncInferenceClient`` (asyncio) classify encoded images,
run raw Open Inference Protocol inference on numpy arrays and check ``grpc.health.v1``.
"""

from server.client.api import (
    AsyncInferenceClient,
    InferenceClient,
    ModelInfo,
    Prediction,
    RequestError,
    TensorSpec,
)
from server.client.connection import ClientConfigError, ConnectionOptions

__all__ = [
    "AsyncInferenceClient",
    "ClientConfigError",
    "ConnectionOptions",
    "InferenceClient",
    "ModelInfo",
    "Prediction",
    "RequestError",
    "TensorSpec",
]
