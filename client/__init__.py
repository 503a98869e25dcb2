"""Client library and program of the inference server: no onnxruntime, no torch, no server code.

A program of its own on the base install (grpc, protobuf, numpy, pillow): it speaks to the
server only through the generated stubs (``protocol``) and the shared ``contracts``.

``InferenceClient`` (blocking) and ``AsyncInferenceClient`` (asyncio) classify encoded images,
run raw Open Inference Protocol inference on numpy arrays and check ``grpc.health.v1``.
"""

from client.api import (
    AsyncInferenceClient,
    InferenceClient,
    ModelInfo,
    Prediction,
    RequestError,
    TensorSpec,
)
from client.connection import ClientConfigError, ConnectionOptions

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
