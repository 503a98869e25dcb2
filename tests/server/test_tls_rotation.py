"""The server's certificate is rotated without a restart: Kubernetes swaps the Secret's files
(a symlink swap, as when cert-manager renews), and new connections to the gRPC and the
HTTP/REST port get the new certificate, from another CA and with another name; a pair that
does not load (a key that is not the certificate's) is refused and the last good one serves."""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from http_helpers import request
from repository_factory import make_model_repository
from server_harness import RunningServer, seconds_until, server_config
from tls_certs import make_ca, make_certs, make_leaf

SEEN_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_repository(tmp_path_factory.mktemp("tls-rotation") / "models")


class SecretVolume:
    """A directory laid out as the kubelet mounts a Secret: ``tls.crt`` -> ``..data/tls.crt``,
    ``..data`` -> ``..VERSION``; ``publish`` swaps ``..data`` in one rename."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir()
        self.versions = 0

    def publish(self, cert: Path, key: Path) -> None:
        self.versions += 1
        version = self.directory / f"..v{self.versions}"
        version.mkdir()
        shutil.copy(cert, version / "tls.crt")
        shutil.copy(key, version / "tls.key")
        link = self.directory / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.directory / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (self.directory / name).is_symlink():
                (self.directory / name).symlink_to(f"..data/{name}")

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        return self.directory / "tls.key"


def _der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def _http_certificate(port: int) -> bytes:
    """The certificate a new HTTPS connection is shown (unverified)."""
    return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port), timeout=10))


def _grpc_trusts(target: str, ca: Path) -> bool:
    """Whether a new connection verified against ``ca`` gets a health answer."""
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    # Its own subchannel: a connection made earlier with the same settings is not reused.
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.secure_channel(target, credentials, options=options) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.UNAVAILABLE, error
            return False
        return True


def _https_trusts(port: int, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    try:
        return request(port, "GET", "/v2/health/live", context=context).status == 200
    except ssl.SSLCertVerificationError:
        return False


def test_certificate_rotation_without_restart(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="server.transport")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    make_certs(first)
    new_ca = make_ca(second, "ca2")
    new_cert, new_key = make_leaf(second, "server-renewed", ca="ca2")
    old_ca = first / "ca.pem"
    volume = SecretVolume(tmp_path / "tls")
    volume.publish(first / "server.pem", first / "server.key")
    config = server_config(repository, http_port=0, tls_cert=volume.cert, tls_key=volume.key)
    with RunningServer(config) as server:
        port, target = server.http_port, server.target
        assert _http_certificate(port) == _der(first / "server.pem")
        assert _grpc_trusts(target, old_ca) and _https_trusts(port, old_ca)
        assert not _grpc_trusts(target, new_ca)

        # A new certificate with the old key: refused, the last good pair keeps serving.
        volume.publish(new_cert, first / "server.key")
        time.sleep(1.5)  # at least one check on each port
        assert _http_certificate(port) == _der(first / "server.pem")
        assert _grpc_trusts(target, old_ca) and _https_trusts(port, old_ca)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings and all("TLS certificate" in w for w in warnings), warnings

        volume.publish(new_cert, new_key)
        http_s = seconds_until(
            lambda: _http_certificate(port) == _der(new_cert), SEEN_WITHIN_S, "the new certificate"
        )
        grpc_s = seconds_until(
            lambda: _grpc_trusts(target, new_ca), SEEN_WITHIN_S, "the new CA over gRPC"
        )
        assert _https_trusts(port, new_ca)
        assert not _grpc_trusts(target, old_ca) and not _https_trusts(port, old_ca)
    assert http_s.within(1.0) and grpc_s.within(1.0), (http_s, grpc_s)
