"""--tls-client-allowed-names: with mTLS, only client certificates whose SAN DNS names or URIs
(the CN when there is no SAN) are listed may call, on the gRPC and the HTTP/REST port; other
certificates of the same CA get UNAUTHENTICATED / 401, and health stays open to them."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from http_helpers import request
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config
from tls_certs import make_certs, make_leaf

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc
from server.config import load_config
from server.errors import ConfigError
from server.transport.access import NAME_REFUSAL, names_from_auth_context, names_from_peercert

ALLOWED = ("reader.example", "spiffe://test/ns/apps/sa/reader")
# Client certificate -> (its subjectAltName, whether it may call).
CLIENTS = {
    "dns-allowed": ("DNS:reader.example", True),
    "uri-allowed": ("URI:spiffe://test/ns/apps/sa/reader,DNS:other.example", True),
    "other": ("DNS:other.example,IP:127.0.0.1", False),
    "reader.example": (None, True),  # no SAN: the CN counts
    "ip-only": ("IP:127.0.0.1", False),
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = make_certs(tmp_path_factory.mktemp("names"))
    for name, (alt_names, _) in CLIENTS.items():
        make_leaf(directory, name, alt_names)
    make_leaf(directory, "cn-beside-san", "DNS:other.example", common_name="reader.example")
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[RunningServer]:
    repository = make_model_repository(tmp_path_factory.mktemp("names-models") / "models")
    config = server_config(
        repository,
        http_port=0,
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.pem",
        tls_client_allowed_names=ALLOWED,
    )
    with RunningServer(config) as running:
        yield running


def _grpc_codes(server: RunningServer, certs: Path, client: str) -> tuple[grpc.StatusCode, int]:
    """(ServerLive's status code, health's status) for a client certificate."""
    credentials = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(),
        (certs / f"{client}.key").read_bytes(),
        (certs / f"{client}.pem").read_bytes(),
    )
    with grpc.secure_channel(server.target, credentials) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            assert error.details() == NAME_REFUSAL
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return code, health.status


def _http_statuses(server: RunningServer, certs: Path, client: str) -> tuple[int, int]:
    """(GET /v2's status, GET /v2/health/ready's status) for a client certificate."""
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.load_cert_chain(certs / f"{client}.pem", certs / f"{client}.key")
    answer = request(server.http_port, "GET", "/v2", context=context)
    if answer.status == 401:
        assert answer.error == NAME_REFUSAL
    health = request(server.http_port, "GET", "/v2/health/ready", context=context)
    return answer.status, health.status


# The CN counts only without any SAN: a listed CN beside an unlisted SAN is refused.
@pytest.mark.parametrize("client", [*CLIENTS, "cn-beside-san"])
def test_only_listed_client_names_may_call(server: RunningServer, certs: Path, client: str) -> None:
    allowed = CLIENTS.get(client, (None, False))[1]
    serving = health_pb2.HealthCheckResponse.SERVING
    expected_code = grpc.StatusCode.OK if allowed else grpc.StatusCode.UNAUTHENTICATED
    assert _grpc_codes(server, certs, client) == (expected_code, serving)
    assert _http_statuses(server, certs, client) == (200 if allowed else 401, 200)


def test_names_of_a_certificate() -> None:
    auth = {
        "x509_common_name": [b"cn"],
        "x509_subject_alternative_name": [b"spiffe://a/b", b"d.example", b"10.0.0.1"],
        "peer_dns": [b"d.example"],
        "peer_uri": [b"spiffe://a/b"],
        "peer_ip": [b"10.0.0.1"],
    }
    assert names_from_auth_context(auth) == {"d.example", "spiffe://a/b"}
    assert names_from_auth_context({"x509_common_name": [b"cn"]}) == {"cn"}
    assert names_from_auth_context({}) == set()
    peercert = {
        "subject": ((("commonName", "cn"),),),
        "subjectAltName": (
            ("DNS", "d.example"),
            ("URI", "spiffe://a/b"),
            ("IP Address", "1.2.3.4"),
        ),
    }
    assert names_from_peercert(peercert) == {"d.example", "spiffe://a/b"}
    assert names_from_peercert({"subject": ((("commonName", "cn"),),)}) == {"cn"}
    assert names_from_peercert(None) == set()


def test_allowed_names_setting() -> None:
    flags = ["--tls-cert=c", "--tls-key=k", "--tls-client-ca=ca"]
    config = load_config(flags, environ={"SERVER_TLS_CLIENT_ALLOWED_NAMES": " a.example, b ,"})
    assert config.tls_client_allowed_names == ("a.example", "b")
    assert load_config(flags, environ={}).tls_client_allowed_names == ()
    with pytest.raises(ConfigError, match="tls_client_allowed_names needs tls_client_ca"):
        load_config(["--tls-client-allowed-names=a"], environ={})
