"""Small asyncio gRPC helpers for driving a test server with many concurrent requests."""

from __future__ import annotations

import grpc
import numpy as np

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc


def infer_request(
    images: np.ndarray, model: str = "classifier", version: str = ""
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="image", datatype="UINT8", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    request.outputs.add(name="probabilities")
    return request


def probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    shape = list(response.outputs[0].shape)
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(shape)


async def infer_async(
    stub: pb_grpc.GRPCInferenceServiceStub, images: np.ndarray, timeout: float | None = 30
) -> pb.ModelInferResponse | grpc.StatusCode:
    """The response, or the status code it failed with."""
    try:
        return await stub.ModelInfer(infer_request(images), timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return error.code()
