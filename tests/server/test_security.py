"""TLS, mTLS and bearer-token auth on the real server accept and refuse as configured, and the
plaintext health-only listener that lets the kubelet probe a TLS server."""

from __future__ import annotations

from concurrent.futures import CancelledError
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import RunningServer, server_config
from tls_certs import make_certs

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    return make_certs(tmp_path_factory.mktemp("certs"))


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


def _health_check(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=30).status


def test_health_port_is_plaintext_health_only_beside_tls(
    model_repository: Path, certs: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    config = server_config(
        model_repository,
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        auth_token_file=token_file,
        health_port=0,
        # Long enough that the drain is still in its NOT_SERVING phase when it is checked;
        # the drain is cancelled below, nothing waits for it.
        drain_delay_s=600.0,
    )
    tls = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with RunningServer(config) as server:
        health_port = server.handle.grpc.health_port
        assert health_port not in (None, 0, server.port)
        serving = health_pb2.HealthCheckResponse.SERVING
        with (
            grpc.insecure_channel(f"127.0.0.1:{health_port}") as plain,
            grpc.secure_channel(server.target, tls) as secure,
            grpc.insecure_channel(server.target) as plain_to_tls,
        ):
            # The kubelet's probe: plaintext Check, no token, for the server and each service.
            assert _health_check(plain) == serving
            assert _health_check(plain, "inference.GRPCInferenceService") == serving
            assert _health_check(secure) == serving
            assert _code(lambda: _health_check(plain_to_tls)) is grpc.StatusCode.UNAVAILABLE
            # Nothing but health on the plaintext port: not inference, not reflection.
            assert _code(lambda: _live(plain)) is grpc.StatusCode.UNIMPLEMENTED
            reflection_info = plain.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            )
            assert _code(lambda: list(reflection_info(iter([b""]), timeout=30))) is (
                grpc.StatusCode.UNIMPLEMENTED
            )

            watch = health_pb2_grpc.HealthStub(plain).Watch(
                health_pb2.HealthCheckRequest(), timeout=120
            )
            assert next(watch).status == serving
            drain = server.submit(server.handle.drain())
            try:
                # The same servicer answers both ports: the drain's NOT_SERVING reaches the
                # plaintext listener as an event, with no wall-clock margin.
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                assert _health_check(plain) == health_pb2.HealthCheckResponse.NOT_SERVING
                assert _health_check(secure) == health_pb2.HealthCheckResponse.NOT_SERVING
            finally:
                watch.cancel()
                drain.cancel()
                with pytest.raises(CancelledError):
                    drain.result(timeout=30)


def test_health_port_is_off_by_default(running_server: RunningServer) -> None:
    assert running_server.config.health_port == -1
    assert running_server.handle.grpc.health_port is None
