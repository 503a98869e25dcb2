"""TLS, mTLS and bearer-token auth on the real server accept and refuse as configured."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import RunningServer, server_config

from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pb_grpc


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    directory = tmp_path_factory.mktemp("certs")
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=test-ca", cwd=directory)  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", "san.ext", cwd=directory)  # fmt: skip
    return directory


def _live(channel: grpc.Channel) -> bool:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    return error.value.code()


def test_tls(model_repository: Path, certs: Path) -> None:
    config = server_config(
        model_repository, tls_cert=certs / "server.pem", tls_key=certs / "server.key"
    )
    credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with RunningServer(config) as server:
        with grpc.secure_channel(server.target, credentials) as channel:
            assert _live(channel)
        with grpc.insecure_channel(server.target) as channel:
            assert _code(lambda: _live(channel)) is grpc.StatusCode.UNAVAILABLE


def test_mtls(model_repository: Path, certs: Path) -> None:
    config = server_config(
        model_repository,
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.pem",
    )
    ca = (certs / "ca.pem").read_bytes()
    with_cert = grpc.ssl_channel_credentials(
        ca, (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()
    )
    with RunningServer(config) as server:
        with grpc.secure_channel(server.target, with_cert) as channel:
            assert _live(channel)
        with grpc.secure_channel(server.target, grpc.ssl_channel_credentials(ca)) as channel:
            assert _code(lambda: _live(channel)) is grpc.StatusCode.UNAVAILABLE


def test_token_auth_with_health_exempt(model_repository: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    config = server_config(model_repository, auth_token_file=token_file)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ServerReadyRequest()
        assert _code(lambda: stub.ServerReady(request, timeout=5)) is (
            grpc.StatusCode.UNAUTHENTICATED
        )
        wrong = (("authorization", "Bearer nope"),)
        assert _code(lambda: stub.ServerReady(request, timeout=5, metadata=wrong)) is (
            grpc.StatusCode.UNAUTHENTICATED
        )
        right = (("authorization", "Bearer s3cret"),)
        assert stub.ServerReady(request, timeout=5, metadata=right).ready
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
