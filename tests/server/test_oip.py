"""Open Inference Protocol through tritonclient.grpc against a real server."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from server_harness import RunningServer

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc


def _reference(model_repository: Path, images: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(
        str(model_repository / "classifier" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    return session.run(["logits", "probabilities"], {"image": images})


def test_metadata_and_config(running_server: RunningServer) -> None:
    client = triton.InferenceServerClient(running_server.target)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("classifier")
    server = client.get_server_metadata()
    assert "statistics" in server.extensions
    metadata = client.get_model_metadata("classifier")
    assert metadata.platform == "onnxruntime_onnx"
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "UINT8", [-1, 32, 32, 3])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("logits", "FP32", [-1, 4]),
        ("probabilities", "FP32", [-1, 4]),
    ]
    config = client.get_model_config("classifier").config
    assert config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [o.label_filename for o in config.output] == ["", "labels.txt"]
    stats = client.get_inference_statistics("classifier")
    assert stats.model_stats[0].name == "classifier"


@pytest.mark.parametrize("batch", [1, 3])
def test_infer_raw_matches_onnxruntime(
    running_server: RunningServer, model_repository: Path, batch: int
) -> None:
    images = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    client = triton.InferenceServerClient(running_server.target)
    tensor = triton.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    result = client.infer(
        "classifier",
        [tensor],
        outputs=[triton.InferRequestedOutput(n) for n in ("logits", "probabilities")],
    )
    logits, probabilities = _reference(model_repository, images)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=1e-6)
    assert result.get_response().model_version == "1"


def test_infer_typed_contents_matches_onnxruntime(
    running_server: RunningServer, model_repository: Path
) -> None:
    images = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    request = pb.ModelInferRequest(model_name="classifier", id="typed-1")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=list(images.shape))
    tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    request.outputs.add(name="probabilities")
    with grpc.insecure_channel(running_server.target) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert response.id == "typed-1"
    assert not response.raw_output_contents
    [output] = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [2, 4])
    _, probabilities = _reference(model_repository, images)
    got = np.array(output.contents.fp32_contents, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(got, probabilities, atol=1e-6)


def test_mixed_raw_and_typed_is_invalid(running_server: RunningServer) -> None:
    request = pb.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[1, 32, 32, 3])
    tensor.contents.uint_contents.extend([0] * 32 * 32 * 3)
    request.raw_input_contents.append(bytes(32 * 32 * 3))
    with grpc.insecure_channel(running_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=10)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in error.value.details()


@pytest.mark.parametrize(
    ("name", "version", "code"),
    [("nope", "", grpc.StatusCode.NOT_FOUND), ("classifier", "9", grpc.StatusCode.NOT_FOUND)],
)
def test_unknown_model_or_version(
    running_server: RunningServer, name: str, version: str, code: grpc.StatusCode
) -> None:
    with grpc.insecure_channel(running_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=10)
    assert error.value.code() is code


def test_stream_infer_and_statistics(running_server: RunningServer) -> None:
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    client = triton.InferenceServerClient(running_server.target)
    received: list[object] = []
    client.start_stream(callback=lambda result, error: received.append(error or result))
    for request_id in ("a", "b", "c"):
        tensor = triton.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        client.async_stream_infer("classifier", [tensor], request_id=request_id)
    client.stop_stream()  # waits for the responses
    assert sorted(r.get_response().id for r in received) == ["a", "b", "c"]  # type: ignore[attr-defined]
    assert all(r.as_numpy("probabilities").shape == (2, 4) for r in received)  # type: ignore[attr-defined]
    [stats] = client.get_inference_statistics("classifier").model_stats
    assert (stats.version, stats.inference_count) == ("1", 6)
    assert stats.inference_stats.success.count == 3
    assert 1 <= stats.execution_count <= 3


def test_class_count_returns_tritons_top_k_strings(
    running_server: RunningServer, model_repository: Path
) -> None:
    images = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    client = triton.InferenceServerClient(running_server.target)
    tensor = triton.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    result = client.infer(
        "classifier",
        [tensor],
        outputs=[
            triton.InferRequestedOutput("probabilities", class_count=3),
            triton.InferRequestedOutput("logits"),
        ],
    )
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3) and top.dtype == np.object_
    _, probabilities = _reference(model_repository, images)
    labels = (model_repository / "classifier" / "labels.txt").read_text().split()
    for row, expected in zip(top, probabilities, strict=True):
        indices = [int(entry.decode().split(":")[1]) for entry in row]
        assert indices == list(np.argsort(-expected, kind="stable")[:3])
        score, index, label = row[0].decode().split(":")
        assert float(score) == pytest.approx(expected.max(), abs=1e-5)
        assert label == labels[int(index)]
    assert result.as_numpy("logits").shape == (2, 4)


def test_output_requested_many_times_is_invalid(running_server: RunningServer) -> None:
    request = pb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 32, 32, 3])
    request.raw_input_contents.append(bytes(32 * 32 * 3))
    request.outputs.add(name="probabilities")
    request.outputs.add(name="probabilities")
    with grpc.insecure_channel(running_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=30)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "requested more than once" in e.value.details()
        # 100,000 of them are refused before the message is parsed, naming the limit.
        for _ in range(100_000):
            request.outputs.add(name="probabilities")
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=30)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "outputs: more than 128 entries" in e.value.details()


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (["nope"], "unknown output 'nope'"),
        (["logits", "probabilities", "extra"], "unknown output 'extra'"),
    ],
)
def test_unknown_outputs_are_invalid(
    running_server: RunningServer, outputs: list[str], message: str
) -> None:
    request = pb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 32, 32, 3])
    request.raw_input_contents.append(bytes(32 * 32 * 3))
    for name in outputs:
        request.outputs.add(name=name)
    with grpc.insecure_channel(running_server.target) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def test_large_typed_request_is_checked_before_conversion(running_server: RunningServer) -> None:
    """A ~16 MB typed request with a wrong shape is refused on the shape, not converted."""
    request = pb.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[2**40, 2**40])
    tensor.contents.uint_contents.extend(range(4_000_000))
    with grpc.insecure_channel(running_server.target) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "too large" in e.value.details()
