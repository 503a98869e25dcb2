"""The Open Inference Protocol over HTTP/REST beside gRPC, on one real server: tritonclient.http
unmodified, JSON and binary tensors, the classification extension, statistics, image classify
like curl sends it, and the same answers the gRPC port gives for the same input."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from http_helpers import request
from PIL import Image
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config

from protocol.finetune.v1 import classifier_pb2 as classifier_pb
from protocol.finetune.v1 import classifier_pb2_grpc as classifier_grpc

OUTPUTS = ("logits", "probabilities")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """gRPC and HTTP/REST on OS-chosen ports, one model ``classifier`` (4 classes, 32 px)."""
    repository = make_model_repository(tmp_path_factory.mktemp("http") / "models")
    with RunningServer(server_config(repository, http_port=0)) as running:
        yield running


def _images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (36, 36, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_metadata_config_statistics_and_index(server: RunningServer) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("classifier")
    assert client.is_model_ready("classifier", "1")
    assert "statistics" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("classifier")
    grpc_client = triton_grpc.InferenceServerClient(server.target)
    expected = grpc_client.get_model_metadata("classifier", as_json=True)
    for key in ("name", "versions", "platform"):
        assert metadata[key] == expected[key]
    for kind in ("inputs", "outputs"):
        assert metadata[kind] == [
            {"name": t["name"], "datatype": t["datatype"], "shape": [int(d) for d in t["shape"]]}
            for t in expected[kind]
        ]
    config = client.get_model_config("classifier")
    assert config["max_batch_size"] == 16
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["input"][0]["dims"] == [32, 32, 3]  # numbers, as Triton writes them
    assert [o["label_filename"] for o in config["output"]] == ["", "labels.txt"]
    before = client.get_inference_statistics("classifier")["model_stats"][0]
    tensor = triton_http.InferInput("image", [2, 32, 32, 3], "UINT8")
    client.infer("classifier", [tensor.set_data_from_numpy(_images(2))])
    stats = client.get_inference_statistics("classifier", "1")["model_stats"][0]
    assert (stats["name"], stats["version"]) == ("classifier", "1")
    assert stats["inference_count"] == before["inference_count"] + 2
    assert stats["inference_stats"]["success"]["count"] == (
        before["inference_stats"]["success"]["count"] + 1
    )
    assert client.get_inference_statistics()["model_stats"][0]["name"] == "classifier"
    assert client.get_model_repository_index() == [
        {"name": "classifier", "version": "1", "state": "READY", "reason": ""}
    ]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_the_grpc_answer(server: RunningServer, binary: bool, batch: int) -> None:
    images = _images(batch, seed=batch)
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    tensor = triton_http.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = [triton_http.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    answer = http_client.infer("classifier", [tensor], outputs=outputs, request_id="r-1")
    grpc_client = triton_grpc.InferenceServerClient(server.target)
    grpc_tensor = triton_grpc.InferInput("image", list(images.shape), "UINT8")
    expected = grpc_client.infer(
        "classifier",
        [grpc_tensor.set_data_from_numpy(images)],
        outputs=[triton_grpc.InferRequestedOutput(n) for n in OUTPUTS],
    )
    for name in OUTPUTS:
        np.testing.assert_allclose(answer.as_numpy(name), expected.as_numpy(name), rtol=1e-6)
    response = answer.get_response()
    assert (response["model_version"], response["id"]) == ("1", "r-1")
    is_binary = [o.get("parameters", {}).get("binary_data_size") is not None
                 for o in response["outputs"]]  # fmt: skip
    assert is_binary == [binary, binary]
    route = "/v2/models/{model}/infer"
    assert (
        server.sample(
            "http_server_requests_total", {"method": "POST", "route": route, "code": "200"}
        )
        >= 1
    )


def test_outputs_not_named_come_back_binary_as_tritonclient_asks(server: RunningServer) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    tensor = triton_http.InferInput("image", [1, 32, 32, 3], "UINT8")
    answer = client.infer(
        "classifier",
        [tensor.set_data_from_numpy(_images(1))],
        request_compression_algorithm="gzip",  # Content-Encoding: gzip, undone by the server
    )
    assert [o["name"] for o in answer.get_response()["outputs"]] == list(OUTPUTS)
    assert answer.as_numpy("probabilities").shape == (1, 4)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension_equals_the_grpc_answer(
    server: RunningServer, binary: bool
) -> None:
    images = _images(2, seed=5)
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    tensor = triton_http.InferInput("image", [2, 32, 32, 3], "UINT8")
    output = triton_http.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    answer = http_client.infer(
        "classifier", [tensor.set_data_from_numpy(images, binary_data=binary)], outputs=[output]
    )
    grpc_client = triton_grpc.InferenceServerClient(server.target)
    grpc_tensor = triton_grpc.InferInput("image", [2, 32, 32, 3], "UINT8")
    expected = grpc_client.infer(
        "classifier",
        [grpc_tensor.set_data_from_numpy(images)],
        outputs=[triton_grpc.InferRequestedOutput("probabilities", class_count=3)],
    ).as_numpy("probabilities")
    got = answer.as_numpy("probabilities")
    assert got.shape == (2, 3)
    # JSON carries strings, the binary extension bytes; "score:index:label" either way.
    assert [[str(v, "utf-8") if isinstance(v, bytes) else v for v in row] for row in got] == [
        [v.decode() for v in row] for row in expected
    ]


def test_classify_one_image_as_curl_sends_it_equals_grpc(server: RunningServer) -> None:
    image = _png(1)
    # curl --data-binary @cat.png -H 'Content-Type: image/png' .../classify?top_k=2
    url = f"http://127.0.0.1:{server.http_port}/v2/models/classifier/classify?top_k=2&id=c1"
    sent = urllib.request.Request(url, data=image, headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(sent, timeout=30) as response:
        assert response.headers.get_content_type() == "application/json"
        answer = json.loads(response.read())
    with grpc.insecure_channel(server.target) as channel:
        expected = classifier_grpc.ClassifierStub(channel).Classify(
            classifier_pb.ClassifyRequest(images=[image], top_k=2), timeout=30
        )
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (
        "classifier",
        "1",
        "c1",
    )
    [result] = answer["results"]
    [want] = expected.results
    assert [(p["label"], p["index"]) for p in result["predictions"]] == [
        (p.label, p.index) for p in want.predictions
    ]
    np.testing.assert_allclose(
        [p["score"] for p in result["predictions"]], [p.score for p in want.predictions], rtol=1e-6
    )
    assert result["abstained"] is want.abstained
    assert result["abstention_threshold"] == pytest.approx(want.abstention_threshold)


def test_classify_several_images_as_multipart(server: RunningServer) -> None:
    images = [_png(seed) for seed in (2, 3, 4)]

    async def post() -> tuple[int, dict]:
        form = aiohttp.FormData()
        for index, image in enumerate(images):
            form.add_field("image", image, filename=f"{index}.png", content_type="image/png")
        url = f"http://127.0.0.1:{server.http_port}/v2/models/classifier/versions/1/classify"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=form, params={"top_k": "4", "abstention_threshold": "0"}) as r,
        ):
            return r.status, await r.json()

    status, answer = asyncio.run(post())
    assert status == 200, answer
    assert len(answer["results"]) == 3
    for result, image in zip(answer["results"], images, strict=True):
        assert len(result["predictions"]) == 4
        scores = [p["score"] for p in result["predictions"]]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert result["abstained"] is False
        single = request(
            server.http_port,
            "POST",
            "/v2/models/classifier/classify?top_k=4",
            image,
            {"Content-Type": "image/png"},
        ).json()["results"][0]
        assert [p["index"] for p in single["predictions"]] == [
            p["index"] for p in result["predictions"]
        ]


def test_a_load_test_mark_keeps_an_http_classify_out_of_the_production_metrics(
    server: RunningServer,
) -> None:
    labels = {"model": "classifier", "version": "1"}
    before = server.sample("classification_load_test_predictions_total", labels)
    answer = request(
        server.http_port,
        "POST",
        "/v2/models/classifier/classify",
        _png(9),
        {"Content-Type": "image/png", "x-load-test": "1"},
    )
    assert answer.status == 200, answer.body
    assert server.sample("classification_load_test_predictions_total", labels) == before + 1


def test_http_port_is_off_in_the_harness_and_8000_by_default(tmp_path: Path) -> None:
    from server.config import ServerConfig, load_config
    from server.errors import ConfigError

    assert ServerConfig().http_port == 8000
    assert load_config([], {"SERVER_HTTP_PORT": "0"}).http_port == 0
    config_file = tmp_path / "server.yaml"
    config_file.write_text("http-port: -1\n")
    assert load_config(["--config", str(config_file)], {}).http_port == -1
    assert load_config(["--http-port", "9000"], {}).http_port == 9000
    assert server_config(tmp_path).http_port == -1
    with pytest.raises(ConfigError, match=r"http_port must be in -1\.\.65535, got -2"):
        load_config(["--http-port", "-2"], {})
