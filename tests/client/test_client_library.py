"""The client library (sync and asyncio) against a real server on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import subprocess
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from server_harness import RunningServer, server_config

from client import (
    AsyncInferenceClient,
    ClientConfigError,
    ConnectionOptions,
    InferenceClient,
    RequestError,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 250), (20, 20, 20)]


def solid_png(rgb: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    """A one-colour image: any resize and crop leaves its pixels unchanged, so the server's
    preprocessing is exactly a constant 32x32 array of that colour."""
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def solid_arrays(colours: list[tuple[int, int, int]]) -> np.ndarray:
    return np.stack([np.full((32, 32, 3), c, dtype=np.uint8) for c in colours])


def reference(model_repository: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        str(model_repository / "classifier" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    logits, probabilities = session.run(["logits", "probabilities"], {"image": images})
    return {"logits": logits, "probabilities": probabilities}


def test_sync_client_classify_infer_health(
    running_server: RunningServer, model_repository: Path
) -> None:
    options = ConnectionOptions(target=running_server.target, timeout_s=10)
    with InferenceClient(options) as client:
        assert client.health() == "SERVING"
        info = client.model_metadata("classifier")
        results = client.classify([solid_png(c) for c in COLOURS], top_k=3)
        outputs = client.infer("classifier", {"image": solid_arrays(COLOURS)})

    assert info.name == "classifier"
    assert [(t.name, t.datatype, t.shape) for t in info.inputs] == [
        ("image", "UINT8", (-1, 32, 32, 3))
    ]
    expected = reference(Path(running_server.config.model_repository), solid_arrays(COLOURS))
    assert set(outputs) == {"logits", "probabilities"}
    np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-5, atol=1e-5)

    assert len(results) == len(COLOURS)
    for predictions, row in zip(results, expected["probabilities"], strict=True):
        top = np.argsort(-row)[:3]
        assert [p.index for p in predictions] == top.tolist()
        assert [p.label for p in predictions] == [f"class_{i}" for i in top]
        np.testing.assert_allclose([p.score for p in predictions], row[top], atol=1e-5)
    # Distinct colours land in distinct classes, so a mixed-up order would be caught.
    assert len({predictions[0].index for predictions in results}) > 1


def test_infer_with_requested_output_and_typed_errors(running_server: RunningServer) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with InferenceClient(ConnectionOptions(target=running_server.target)) as client:
        outputs = client.infer("classifier", {"image": images}, outputs=["probabilities"])
        assert list(outputs) == ["probabilities"]
        assert outputs["probabilities"].shape == (2, 4)
        np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, rtol=1e-5)

        with pytest.raises(RequestError) as unknown:
            client.infer("no-such-model", {"image": images})
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND

        with pytest.raises(RequestError) as wrong_shape:
            client.infer("classifier", {"image": images[:, :16]})
        assert wrong_shape.value.code == grpc.StatusCode.INVALID_ARGUMENT

        with pytest.raises(RequestError) as undecodable:
            client.classify([solid_png((1, 2, 3)), b"not an image"])
        assert undecodable.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "images[1]" in undecodable.value.details

    with pytest.raises(ValueError, match="top_k"):
        InferenceClient(ConnectionOptions(target=running_server.target)).classify([b"x"], 0)


def test_async_client_concurrent_requests_get_their_own_answers(
    running_server: RunningServer,
) -> None:
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (1 + i % 3, 32, 32, 3), dtype=np.uint8) for i in range(12)]
    expected = [
        reference(Path(running_server.config.model_repository), b)["probabilities"] for b in batches
    ]

    async def run() -> tuple[list[dict[str, np.ndarray]], list, str]:
        options = ConnectionOptions(target=running_server.target, timeout_s=10)
        async with AsyncInferenceClient(options) as client:
            answers = await asyncio.gather(
                *(client.infer("classifier", {"image": b}) for b in batches)
            )
            classified = await client.classify([solid_png(c) for c in COLOURS[:2]], top_k=2)
            return list(answers), classified, await client.health()

    answers, classified, status = asyncio.run(run())
    for answer, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(answer["probabilities"], want, rtol=1e-5, atol=1e-6)
    assert [len(p) for p in classified] == [2, 2]
    assert status == "SERVING"


def test_async_classify_stream_answers_each_batch_in_order(running_server: RunningServer) -> None:
    batches = [[solid_png(c)] for c in COLOURS] + [[solid_png(c) for c in COLOURS[:3]]]

    async def run() -> tuple[list, list]:
        async def source():  # type: ignore[no-untyped-def]
            for batch in batches:
                yield batch

        options = ConnectionOptions(target=running_server.target, timeout_s=10)
        async with AsyncInferenceClient(options) as client:
            streamed = [r async for r in client.classify_stream(source(), top_k=2)]
            unary = [await client.classify(b, top_k=2) for b in batches]
            return streamed, unary

    streamed, unary = asyncio.run(run())
    assert [len(r) for r in streamed] == [1] * len(COLOURS) + [3]
    assert [[[p.index for p in ps] for ps in r] for r in streamed] == [
        [[p.index for p in ps] for ps in r] for r in unary
    ]


def test_health_reports_not_serving_before_models_load(model_repository: Path) -> None:
    with (
        RunningServer(server_config(model_repository), start_models=False) as server,
        InferenceClient(ConnectionOptions(target=server.target)) as client,
    ):
        assert client.health() == "NOT_SERVING"


def test_connection_options_reject_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ClientConfigError, match="HOST:PORT"):
        ConnectionOptions(target="localhost")
    with pytest.raises(ClientConfigError, match="together"):
        ConnectionOptions(target="h:1", client_cert=tmp_path / "c.pem")
    with pytest.raises(ClientConfigError, match="single line"):
        ConnectionOptions(target="h:1", token="a\nb")
    with pytest.raises(ClientConfigError, match="cannot read ca_cert"):
        InferenceClient(ConnectionOptions(target="h:1", ca_cert=tmp_path / "missing.pem"))


@pytest.mark.parametrize("target", ["10.0.0.7:8001", "models.example:8001", "[2001:db8::1]:8001"])
def test_a_token_is_not_sent_in_cleartext_to_another_host(target: str) -> None:
    with pytest.raises(ClientConfigError, match="refusing to send the bearer token in cleartext"):
        ConnectionOptions(target=target, token="s3cret")
    # Told so (a sidecar, a trusted network), or over TLS, it is sent.
    assert ConnectionOptions(target=target, token="s3cret", allow_insecure_token=True).token
    assert ConnectionOptions(target=target, token="s3cret", tls=True).token


@pytest.mark.parametrize("target", ["localhost:8001", "127.0.0.1:8001", "[::1]:8001"])
def test_a_token_may_travel_in_cleartext_on_this_machine(target: str) -> None:
    assert ConnectionOptions(target=target, token="s3cret").token == "s3cret"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> None:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test-ca",
             "-days", "1", cwd=directory)  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                 f"/CN={name}", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile",
                 f"{name}.ext", cwd=directory)  # fmt: skip


def test_mutual_tls_and_token(tmp_path: Path, model_repository: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    (tmp_path / "token").write_text("s3cret\n")
    config = server_config(
        model_repository,
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.pem",
        auth_token_file=tmp_path / "token",
    )
    with RunningServer(config) as server:
        mtls = ConnectionOptions(
            target=server.target,
            ca_cert=certs / "ca.pem",
            client_cert=certs / "client.pem",
            client_key=certs / "client.key",
            server_name="localhost",
            timeout_s=10,
        )
        with InferenceClient(dataclasses.replace(mtls, token="s3cret")) as client:
            assert client.classify([solid_png((9, 9, 9))])[0][0].label.startswith("class_")
        # tritonclient's creds= is honoured: the channel is TLS with exactly these credentials.
        creds = grpc.ssl_channel_credentials(
            root_certificates=(certs / "ca.pem").read_bytes(),
            private_key=(certs / "client.key").read_bytes(),
            certificate_chain=(certs / "client.pem").read_bytes(),
        )
        with InferenceClient(
            server.target, creds=creds, server_name="localhost", token="s3cret", timeout_s=10
        ) as client:
            assert client.classify([solid_png((9, 9, 9))])[0][0].label.startswith("class_")
        with InferenceClient(mtls) as client:
            # Health is exempt from the token so Kubernetes probes work.
            assert client.health() == "SERVING"
            with pytest.raises(RequestError) as no_token:
                client.classify([solid_png((9, 9, 9))])
            assert no_token.value.code == grpc.StatusCode.UNAUTHENTICATED
        with InferenceClient(dataclasses.replace(mtls, token="wrong")) as client:
            with pytest.raises(RequestError) as bad_token:
                client.classify([solid_png((9, 9, 9))])
            assert bad_token.value.code == grpc.StatusCode.UNAUTHENTICATED
        no_client_cert = dataclasses.replace(
            mtls, client_cert=None, client_key=None, token="s3cret", timeout_s=3
        )
        with InferenceClient(no_client_cert) as client, pytest.raises(RequestError) as refused:
            client.health()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_client_accepts_host_port_and_keywords(running_server: RunningServer) -> None:
    with InferenceClient(running_server.target) as client:
        assert client.health() == "SERVING"
    with InferenceClient(running_server.target, timeout_s=5.0, verbose=True) as client:
        assert client.options.timeout_s == 5.0
        assert client.health() == "SERVING"
    with pytest.raises(ClientConfigError, match="unknown connection option 'colour'"):
        InferenceClient(running_server.target, colour="blue")
    options = ConnectionOptions(target=running_server.target)
    with InferenceClient(options, ssl=False) as client:
        assert client.options.tls is False and client.health() == "SERVING"


def test_async_client_accepts_host_port(running_server: RunningServer) -> None:
    async def health() -> str:
        client = AsyncInferenceClient(running_server.target)
        try:
            return await client.health()
        finally:
            await client.close()

    assert asyncio.run(health()) == "SERVING"
