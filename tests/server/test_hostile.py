"""Hostile traffic against one real server: each case gets a clear status code, memory stays
bounded, nothing is INTERNAL, and health stays SERVING; then a short soak of mixed valid and
invalid traffic with flat memory after warm-up (SOAK_SECONDS, default 10). Both transports: the
gRPC APIs, and OIP over HTTP/REST with its classify endpoint (the same cases as HTTP requests:
400 where gRPC says INVALID_ARGUMENT, never a 500)."""

from __future__ import annotations

import asyncio
import io
import os
import random
import struct
import time
import zlib
from collections.abc import Callable, Iterator

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import infer_request
from http_helpers import request as http_request
from PIL import Image
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config

from protocol.finetune.v1 import classifier_pb2, classifier_pb2_grpc
from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MIB = 1024 * 1024


def rss_bytes() -> int:
    """This process's resident memory (the server runs in it), from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def rotated_sliver_jpeg() -> bytes:
    image = Image.new("RGB", (60_000, 1))
    exif = image.getexif()
    exif[0x0112] = 6  # shown as 1 x 60,000
    return _encode(image, "JPEG", exif=exif.tobytes())


def many_frames(fmt: str, count: int = 200) -> bytes:
    frames = [Image.new("RGB", (64, 64), (i % 256, 0, 0)) for i in range(count)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:])


def sixteen_bit_png() -> bytes:
    return _encode(Image.fromarray(np.full((40, 40), 40_000, np.uint16)), "PNG")


def classify(*images: bytes) -> classifier_pb2.ClassifyRequest:
    return classifier_pb2.ClassifyRequest(images=list(images))


def repeated_outputs() -> pb.ModelInferRequest:
    request = infer_request(np.zeros((1, 32, 32, 3), np.uint8))
    for _ in range(100_000):
        request.outputs.add(name="probabilities")
    return request


def overflowing_shape() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="image", datatype="UINT8", shape=[2**62, 2**62, 16])
    request.raw_input_contents.append(b"\x00" * 16)
    return request


def large_typed_contents() -> pb.ModelInferRequest:
    """~16 MB of typed FP32 contents: converted off the event loop, then refused (the model
    takes UINT8)."""
    request = pb.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[4_000_000])
    tensor.contents.fp32_contents.extend(np.zeros(4_000_000, np.float32))
    return request


Case = tuple[str, Callable[[grpc.Channel], object], grpc.StatusCode]


def _classify_call(request: classifier_pb2.ClassifyRequest) -> Callable[[grpc.Channel], object]:
    return lambda channel: classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=60)


def _infer_call(build: Callable[[], pb.ModelInferRequest]) -> Callable[[grpc.Channel], object]:
    return lambda channel: pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(build(), timeout=60)


def cases() -> list[Case]:
    slivers = [
        Image.new("L", (1, 400_000)),
        Image.new("L", (400_000, 1)),
        Image.new("RGB", (3, 65_000)),
        Image.new("RGB", (65_000, 3)),
    ]
    return [
        *(
            (f"sliver {i}", _classify_call(classify(_encode(s, "PNG"))), INVALID)
            for i, s in enumerate(slivers)
        ),
        ("rotated sliver", _classify_call(classify(rotated_sliver_jpeg())), INVALID),
        ("bomb header", _classify_call(classify(png_declaring(100_000, 100_000))), INVALID),
        ("huge dims", _classify_call(classify(png_declaring(2**31 - 1, 2**31 - 1))), INVALID),
        ("many-frame GIF", _classify_call(classify(many_frames("GIF"))), INVALID),
        ("many-frame WebP", _classify_call(classify(many_frames("WEBP"))), OK),
        ("TIFF", _classify_call(classify(_encode(Image.new("RGB", (40, 40)), "TIFF"))), INVALID),
        ("16-bit PNG", _classify_call(classify(sixteen_bit_png())), OK),
        ("CMYK JPEG", _classify_call(classify(_encode(Image.new("CMYK", (40, 40)), "JPEG"))), OK),
        ("too many images", _classify_call(classify(*[sixteen_bit_png()] * 65)), INVALID),
        ("repeated outputs", _infer_call(repeated_outputs), INVALID),
        ("overflowing shape", _infer_call(overflowing_shape), INVALID),
        ("16 MB typed contents", _infer_call(large_typed_contents), INVALID),
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = make_model_repository(tmp_path_factory.mktemp("hostile") / "models")
    config = server_config(repository, preprocess_workers=2, http_port=0)
    with RunningServer(config) as running:
        yield running


def _code(call: Callable[[grpc.Channel], object], channel: grpc.Channel) -> grpc.StatusCode:
    try:
        call(channel)
    except grpc.RpcError as error:
        return error.code()
    return OK


def _health(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service="")
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def test_hostile_battery(server: RunningServer) -> None:
    battery = cases()
    with grpc.insecure_channel(server.target) as channel:
        for _name, call, _expected in battery[:2]:  # warm-up: pools, arenas, first decode
            _code(call, channel)
        before = rss_bytes()
        got = {name: _code(call, channel) for name, call, _ in battery}
        grown = rss_bytes() - before
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert got == {name: expected for name, _, expected in battery}
    assert grown < 300 * MIB, f"RSS grew {grown / MIB:.0f} MiB over the battery"


async def _soak(target: str, seconds: float) -> tuple[dict[grpc.StatusCode, int], list[int]]:
    valid_image = _encode(Image.new("RGB", (48, 40), (10, 200, 30)), "JPEG")
    requests: list[tuple[str, object]] = [
        ("classify", classify(valid_image)),
        ("classify", classify(valid_image, valid_image)),
        ("classify", classify(_encode(Image.new("L", (1, 20_000)), "PNG"))),
        ("classify", classify(b"not an image")),
        ("classify", classify(png_declaring(30_000, 30_000))),
        ("infer", infer_request(np.zeros((2, 32, 32, 3), np.uint8))),
        ("infer", overflowing_shape()),
        ("infer", pb.ModelInferRequest(model_name="missing")),
    ]
    codes: dict[grpc.StatusCode, int] = {}
    samples: list[int] = []
    rng = random.Random(0)
    ends = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        classifier = classifier_pb2_grpc.ClassifierStub(channel)
        oip = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            while time.monotonic() < ends:
                kind, request = rng.choice(requests)
                method = classifier.Classify if kind == "classify" else oip.ModelInfer
                try:
                    await method(request, timeout=30)
                    code = OK
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                codes[code] = codes.get(code, 0) + 1

        async def sampler() -> None:
            while time.monotonic() < ends:
                samples.append(rss_bytes())
                await asyncio.sleep(0.25)

        await asyncio.gather(sampler(), *(worker() for _ in range(4)))
    return codes, samples


def test_soak_of_mixed_traffic(server: RunningServer) -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "10"))
    codes, samples = asyncio.run(_soak(server.target, seconds))
    assert codes.get(OK, 0) > 0 and codes.get(INVALID, 0) > 0
    assert not set(codes) - {OK, INVALID, grpc.StatusCode.NOT_FOUND}, codes
    warm = samples[len(samples) // 4 :]  # after warm-up
    growth = max(warm[len(warm) // 2 :]) - max(warm[: len(warm) // 2])
    assert growth < 64 * MIB, f"RSS grew {growth / MIB:.0f} MiB in the second half of the soak"
    with grpc.insecure_channel(server.target) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


# ---- the same over HTTP/REST ----------------------------------------------------------------

CLASSIFY = "/v2/models/classifier/classify"
INFER = "/v2/models/classifier/infer"
HTTP_STATUS = {OK: 200, INVALID: 400}
HttpCase = tuple[str, str, bytes, dict[str, str], int]


def _multipart(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    boundary = "hostile-boundary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
        for i, image in enumerate(images)
    )
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _infer_json(document: dict) -> tuple[bytes, dict[str, str]]:
    import json

    return json.dumps(document).encode(), {"Content-Type": "application/json"}


def http_cases() -> list[HttpCase]:
    """The battery's images as classify bodies, and its OIP requests as JSON infer bodies."""
    raw = {"Content-Type": "application/octet-stream"}
    images = {
        "sliver": _encode(Image.new("L", (1, 400_000)), "PNG"),
        "rotated sliver": rotated_sliver_jpeg(),
        "bomb header": png_declaring(100_000, 100_000),
        "huge dims": png_declaring(2**31 - 1, 2**31 - 1),
        "many-frame GIF": many_frames("GIF"),
        "many-frame WebP": many_frames("WEBP"),
        "TIFF": _encode(Image.new("RGB", (40, 40)), "TIFF"),
        "16-bit PNG": sixteen_bit_png(),
        "CMYK JPEG": _encode(Image.new("CMYK", (40, 40)), "JPEG"),
    }
    grpc_codes = {name: expected for name, _, expected in cases()}
    grpc_codes["sliver"] = grpc_codes["sliver 0"]
    zeros = np.zeros((1, 32, 32, 3), np.uint8).reshape(-1).tolist()
    image = {"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": zeros}
    return [
        *(
            (name, CLASSIFY, body, raw, HTTP_STATUS[grpc_codes[name]])
            for name, body in images.items()
        ),
        ("too many images", CLASSIFY, *_multipart([sixteen_bit_png()] * 65), 400),
        (
            "repeated outputs",
            INFER,
            *_infer_json({"inputs": [image], "outputs": [{"name": "probabilities"}] * 100_000}),
            400,
        ),
        (
            "overflowing shape",
            INFER,
            *_infer_json({"inputs": [{**image, "shape": [2**62, 2**62, 16], "data": [0] * 16}]}),
            400,
        ),
        (
            "4 MB typed contents",
            INFER,
            *_infer_json(
                {
                    "inputs": [
                        {
                            **image,
                            "datatype": "FP32",
                            "shape": [1_000_000],
                            "data": [0.0] * 1_000_000,
                        }
                    ]
                }
            ),
            400,
        ),
    ]


def _post(server: RunningServer, path: str, body: bytes, headers: dict[str, str]) -> int:
    return http_request(server.http_port, "POST", path, body, headers).status


def test_hostile_battery_over_http(server: RunningServer) -> None:
    battery = http_cases()
    for _name, path, body, headers, _status in battery[:2]:  # warm-up
        _post(server, path, body, headers)
    before = rss_bytes()
    got = {name: _post(server, path, body, headers) for name, path, body, headers, _ in battery}
    grown = rss_bytes() - before
    assert got == {name: status for name, _, _, _, status in battery}
    assert grown < 300 * MIB, f"RSS grew {grown / MIB:.0f} MiB over the HTTP battery"
    assert http_request(server.http_port, "GET", "/v2/health/ready").status == 200


async def _http_soak(port: int, seconds: float) -> tuple[dict[int, int], list[int]]:
    valid = _encode(Image.new("RGB", (48, 40), (10, 200, 30)), "JPEG")
    raw = {"Content-Type": "application/octet-stream"}
    zeros = np.zeros((2, 32, 32, 3), np.uint8).reshape(-1).tolist()
    good_infer = {
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 32, 32, 3], "data": zeros}]
    }
    requests: list[tuple[str, bytes, dict[str, str]]] = [
        (CLASSIFY, valid, raw),
        (CLASSIFY, *_multipart([valid, valid])),
        (CLASSIFY, _encode(Image.new("L", (1, 20_000)), "PNG"), raw),
        (CLASSIFY, b"not an image", raw),
        (CLASSIFY, png_declaring(30_000, 30_000), raw),
        (INFER, *_infer_json(good_infer)),
        (INFER, b"{not json", {"Content-Type": "application/json"}),
        ("/v2/models/missing/infer", *_infer_json(good_infer)),
    ]
    statuses: dict[int, int] = {}
    samples: list[int] = []
    rng = random.Random(0)
    ends = time.monotonic() + seconds
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

        async def worker() -> None:
            while time.monotonic() < ends:
                path, body, headers = rng.choice(requests)
                async with session.post(path, data=body, headers=headers) as reply:
                    await reply.read()
                    statuses[reply.status] = statuses.get(reply.status, 0) + 1

        async def sampler() -> None:
            while time.monotonic() < ends:
                samples.append(rss_bytes())
                await asyncio.sleep(0.25)

        await asyncio.gather(sampler(), *(worker() for _ in range(4)))
    return statuses, samples


def test_soak_of_mixed_traffic_over_http(server: RunningServer) -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "10"))
    statuses, samples = asyncio.run(_http_soak(server.http_port, seconds))
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0
    assert not set(statuses) - {200, 400, 404}, statuses
    warm = samples[len(samples) // 4 :]
    growth = max(warm[len(warm) // 2 :]) - max(warm[: len(warm) // 2])
    assert growth < 64 * MIB, f"RSS grew {growth / MIB:.0f} MiB in the second half of the soak"
    assert http_request(server.http_port, "GET", "/v2/health/ready").status == 200
