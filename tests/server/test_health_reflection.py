"""Health transitions (loading -> SERVING -> draining -> NOT_SERVING) and reflection."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import infer_request
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from server_harness import RunningServer, server_config

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _wait_for_refusal(stub: pb_grpc.GRPCInferenceServiceStub, request: object) -> object:
    limit = time.monotonic() + 30
    while time.monotonic() < limit:
        try:
            stub.ModelInfer(request, timeout=5)
        except grpc.RpcError as error:
            return error.code()
        time.sleep(0.05)
    raise AssertionError("requests were still served 30 s into the drain")


def test_health_follows_loading_serving_and_draining(model_repository: Path) -> None:
    # The delay is long enough that the request below lands inside it on a loaded machine.
    config = server_config(model_repository, drain_delay_s=3.0, grace_period_s=5)
    server = RunningServer(config, start_models=False)
    try:
        with grpc.insecure_channel(server.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30
            )
            assert _check(channel) == NOT_SERVING
            assert _check(channel, "inference.GRPCInferenceService") == NOT_SERVING
            assert next(watch).status == NOT_SERVING
            server.call(server.handle.start())
            assert _check(channel) == SERVING
            assert _check(channel, "finetune.v1.Classifier") == SERVING
            assert next(watch).status == SERVING
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = infer_request(np.zeros((1, 32, 32, 3), dtype=np.uint8))
            draining = server.submit(server.handle.drain())
            # Draining: NOT_SERVING at once, but requests are still served during the delay.
            assert next(watch).status == NOT_SERVING
            assert _check(channel) == NOT_SERVING
            assert stub.ModelInfer(request, timeout=5).model_version == "1"
            # After the delay, new requests are refused; wait for that rather than for a time.
            code = _wait_for_refusal(stub, request)
            assert code is grpc.StatusCode.UNAVAILABLE
            draining.result(timeout=30)
    finally:
        server.stop()


def test_reflection_lists_the_services(running_server: RunningServer) -> None:
    with grpc.insecure_channel(running_server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "inference.GRPCInferenceService",
            "finetune.v1.Classifier",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("inference.GRPCInferenceService").methods_by_name[
            "ModelInfer"
        ]
        assert method.input_type.full_name == "inference.ModelInferRequest"
        classify = pool.FindMessageTypeByName("finetune.v1.ClassifyRequest")
        assert "images" in classify.fields_by_name


def test_server_ready_and_model_ready(running_server: RunningServer) -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        async with grpc.aio.insecure_channel(running_server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            live = (await stub.ServerLive(pb.ServerLiveRequest())).live
            ready = (await stub.ServerReady(pb.ServerReadyRequest())).ready
            model = (await stub.ModelReady(pb.ModelReadyRequest(name="classifier"))).ready
            return live, ready, model

    assert asyncio.run(scenario()) == (True, True, True)


_ABRUPT_REFLECTION_CLIENT = """
import os, sys, time, grpc
from grpc_reflection.v1alpha import reflection_pb2 as pb, reflection_pb2_grpc as pb_grpc
stub = pb_grpc.ServerReflectionStub(grpc.insecure_channel(sys.argv[1]))
def requests():
    yield pb.ServerReflectionRequest(list_services="")
    for _ in range(200):
        yield pb.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
    time.sleep(5)
next(iter(stub.ServerReflectionInfo(requests())))
os._exit(0)  # gone mid-stream, as a killed grpcurl would be
"""


def test_reflection_client_that_disconnects_is_not_an_error(
    running_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(4):
        subprocess.run(
            [sys.executable, "-c", _ABRUPT_REFLECTION_CLIENT, running_server.target],
            check=True,
            timeout=60,
        )
    labels = {
        "grpc_service": "grpc.reflection.v1alpha.ServerReflection",
        "grpc_method": "ServerReflectionInfo",
        "grpc_type": "bidi_stream",
    }
    codes = ("OK", "CANCELLED", "INTERNAL", "UNKNOWN")

    def handled() -> dict[str, float]:
        return {
            code: running_server.sample("grpc_server_handled_total", {**labels, "grpc_code": code})
            for code in codes
        }

    deadline = time.monotonic() + 30
    while sum(handled().values()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the server has noticed every closed connection
    assert sum(handled().values()) == 4
    assert handled()["INTERNAL"] == handled()["UNKNOWN"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
