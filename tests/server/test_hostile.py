"""Hostile traffic against one real server: each case gets a clear status code, memory stays
bounded, nothing is INTERNAL, and health stays SERVING; then a short soak of mixed valid and
invalid traffic with flat memory after warm-up (SOAK_SECONDS, default 10)."""

from __future__ import annotations

import asyncio
import io
import os
import random
import struct
import time
import zlib
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import infer_request
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
    with RunningServer(server_config(repository, preprocess_workers=2)) as running:
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
