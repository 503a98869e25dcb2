"""finetune.v1.Classifier: encoded images in, top-k labels out, matching onnxruntime."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from server_harness import RunningServer, server_config

from protocol.finetune.v1 import classifier_pb2 as pb
from protocol.finetune.v1 import classifier_pb2_grpc as pb_grpc

# The fixture model: 32x32 crop after resizing the shorter side to int(32 * 8 / 7) = 36.
RESIZE, CROP = 36, 32


def _encode(array: np.ndarray, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _expected(model_repository: Path, arrays: list[np.ndarray]) -> np.ndarray:
    """Reference: arrays are already RESIZE x RESIZE, so preprocessing is a centre crop."""
    offset = (RESIZE - CROP) // 2
    batch = np.stack([a[offset : offset + CROP, offset : offset + CROP] for a in arrays])
    session = ort.InferenceSession(
        str(model_repository / "classifier" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    return session.run(["probabilities"], {"image": batch})[0]


def _arrays(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (RESIZE, RESIZE, 3), dtype=np.uint8) for _ in range(count)]


def test_classify_batch_top_k_matches_onnxruntime(
    running_server: RunningServer, model_repository: Path
) -> None:
    arrays = _arrays(3)
    expected = _expected(model_repository, arrays)
    request = pb.ClassifyRequest(images=[_encode(a) for a in arrays], top_k=3, id="req-1")
    with grpc.insecure_channel(running_server.target) as channel:
        response = pb_grpc.ClassifierStub(channel).Classify(request, timeout=10)
    assert (response.model_name, response.model_version, response.id) == (
        "classifier",
        "1",
        "req-1",
    )
    assert len(response.results) == 3
    for result, want in zip(response.results, expected, strict=True):
        order = np.argsort(-want)[:3]
        assert [p.index for p in result.predictions] == order.tolist()
        assert [p.label for p in result.predictions] == [f"class_{i}" for i in order]
        np.testing.assert_allclose([p.score for p in result.predictions], want[order], atol=1e-5)


def test_exif_orientation_is_applied(running_server: RunningServer, model_repository: Path) -> None:
    upright = _arrays(1)[0]
    upright[:8] = 255  # make orientation matter
    stored = np.rot90(upright, 2).copy()  # rotated 180 on disk, EXIF says rotate back
    exif = Image.Exif()
    exif[0x0112] = 3
    request = pb.ClassifyRequest(images=[_encode(stored, exif=exif.tobytes())], top_k=4)
    with grpc.insecure_channel(running_server.target) as channel:
        response = pb_grpc.ClassifierStub(channel).Classify(request, timeout=10)
    expected = _expected(model_repository, [upright])[0]
    scores = {p.index: p.score for p in response.results[0].predictions}
    np.testing.assert_allclose([scores[i] for i in range(4)], expected, atol=1e-5)


def test_stream_answers_each_request_in_order(running_server: RunningServer) -> None:
    images = [_encode(a, "JPEG", quality=90) for a in _arrays(4)]
    requests = [pb.ClassifyRequest(images=[image], id=str(i)) for i, image in enumerate(images)]
    with grpc.insecure_channel(running_server.target) as channel:
        responses = list(pb_grpc.ClassifierStub(channel).ClassifyStream(iter(requests), timeout=10))
    assert [r.id for r in responses] == ["0", "1", "2", "3"]
    assert all(len(r.results[0].predictions) == 1 for r in responses)


def test_undecodable_image_names_its_index(running_server: RunningServer) -> None:
    request = pb.ClassifyRequest(images=[_encode(_arrays(1)[0]), b"\x89PNG not really"])
    with (
        grpc.insecure_channel(running_server.target) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        pb_grpc.ClassifierStub(channel).Classify(request, timeout=10)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "images[1]" in error.value.details()


def test_pixel_limit_rejects_large_images(model_repository: Path) -> None:
    config = server_config(model_repository, max_image_pixels=1000)
    request = pb.ClassifyRequest(images=[_encode(_arrays(1)[0])])  # 36*36 = 1296 pixels
    with (
        RunningServer(config) as server,
        grpc.insecure_channel(server.target) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        pb_grpc.ClassifierStub(channel).Classify(request, timeout=10)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0]" in error.value.details() and "limit" in error.value.details()


def test_messages_over_grpcs_4_mib_default_are_accepted(model_repository: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)
    image = _encode(noise, compress_level=0)
    assert len(image) > 5 * 1024 * 1024
    request = pb.ClassifyRequest(images=[image])
    with RunningServer(server_config(model_repository)) as server:
        with grpc.insecure_channel(server.target) as channel:
            response = pb_grpc.ClassifierStub(channel).Classify(request, timeout=30)
        assert len(response.results[0].predictions) == 1
    small = server_config(model_repository, max_message_bytes=1024 * 1024)
    with (
        RunningServer(small) as server,
        grpc.insecure_channel(server.target) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        pb_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_images_per_request_are_capped(model_repository: Path) -> None:
    config = server_config(model_repository, max_images_per_request=2)
    request = pb.ClassifyRequest(images=[_encode(a) for a in _arrays(3)])
    with (
        RunningServer(config) as server,
        grpc.insecure_channel(server.target) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        pb_grpc.ClassifierStub(channel).Classify(request, timeout=10)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_images_per_request" in error.value.details()


@pytest.mark.parametrize("size", [(1, 400_000), (400_000, 1)])
def test_slivers_are_refused_naming_the_limit(
    running_server: RunningServer, size: tuple[int, int]
) -> None:
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, format="PNG")
    request = pb.ClassifyRequest(images=[buffer.getvalue()])
    with grpc.insecure_channel(running_server.target) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.ClassifierStub(channel).Classify(request, timeout=10)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_image_aspect" in e.value.details()
