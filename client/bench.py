"""Requests for the load generator: classification of encoded images, or raw OIP inference.

Each request is serialized once up front and sent as bytes, and responses are not parsed: the
load generator shares the CPU with what it measures, so it should spend as little as possible.
"""

from __future__ import annotations

import io

import numpy as np

from client.api import AsyncInferenceClient, ModelInfo
from client.loadgen import Call, LoadSpec, run_load
from client.stats import BenchReport
from client.tensors import TensorError, build_infer_request, numpy_dtype
from contracts.load_test import LOAD_TEST_METADATA
from protocol.finetune.v1 import classifier_pb2

CLASSIFY_METHOD = "/finetune.v1.Classifier/Classify"
MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


class BenchSetupError(ValueError):
    """The benchmark cannot build its request (unknown model, unsupported input...)."""


def synthetic_jpeg(size: int = 256, seed: int = 0) -> bytes:
    """A noisy RGB JPEG, so a benchmark needs no image file."""
    from PIL import Image  # Pillow is only needed when no image file is given.

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def classify_payload(image: bytes, batch: int, model_name: str = "") -> bytes:
    return classifier_pb2.ClassifyRequest(
        images=[image] * batch, top_k=1, model_name=model_name
    ).SerializeToString()


def infer_payload(info: ModelInfo, batch: int, model_version: str = "", seed: int = 0) -> bytes:
    """A ModelInfer request with random inputs shaped as the metadata says, batch first."""
    rng = np.random.default_rng(seed)
    if not info.inputs:
        raise BenchSetupError(f"the metadata of model {info.name!r} lists no inputs")
    inputs: dict[str, np.ndarray] = {}
    for spec in info.inputs:
        try:
            dtype = numpy_dtype(spec.datatype)
        except TensorError:
            raise BenchSetupError(
                f"input {spec.name!r} has datatype {spec.datatype}; "
                "the benchmark generates numeric inputs only"
            ) from None
        if not spec.shape or any(d < 0 for d in spec.shape[1:]):
            raise BenchSetupError(
                f"input {spec.name!r} has shape {list(spec.shape)}; the benchmark needs fixed "
                "dimensions after the batch dimension"
            )
        shape = (batch, *spec.shape[1:])
        if dtype.kind == "b":
            inputs[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        elif dtype.kind in "iu":
            inputs[spec.name] = rng.integers(0, 256, shape).astype(dtype)
        else:
            inputs[spec.name] = rng.standard_normal(shape).astype(dtype)
    return build_infer_request(info.name, inputs, model_version=model_version).SerializeToString()


def raw_call(client: AsyncInferenceClient, method: str, payload: bytes) -> Call:
    """A coroutine factory sending ``payload`` as-is to ``method``, marked as a load test so
    the server keeps it out of its production metrics (``contracts.load_test``)."""
    # No serializer: grpc sends the bytes untouched and hands back the response bytes.
    multicallable = client.channel.unary_unary(method)
    metadata = (*client.options.call_metadata(), LOAD_TEST_METADATA)
    timeout = client.options.timeout_s

    async def call() -> object:
        return await multicallable(payload, timeout=timeout, metadata=metadata)

    return call


async def bench_classify(
    client: AsyncInferenceClient, spec: LoadSpec, image: bytes, model_name: str = ""
) -> BenchReport:
    payload = classify_payload(image, spec.batch, model_name)
    return await run_load(
        raw_call(client, CLASSIFY_METHOD, payload), spec, target=client.options.target
    )


async def bench_infer(
    client: AsyncInferenceClient,
    spec: LoadSpec,
    model_name: str,
    model_version: str = "",
    *,
    info: ModelInfo | None = None,
) -> BenchReport:
    """Loads the server with ModelInfer requests of random inputs.

    The inputs follow ``info``, or the server's ModelMetadata when ``info`` is not given.
    """
    if info is None:
        info = await client.model_metadata(model_name, model_version)
    payload = infer_payload(info, spec.batch, model_version)
    return await run_load(
        raw_call(client, MODEL_INFER_METHOD, payload), spec, target=client.options.target
    )
