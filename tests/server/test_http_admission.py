"""What the HTTP/REST listener refuses, and how: every bad request is a 4xx with
``{"error": ...}`` naming the problem (never a 500), the token and the limits are checked from
the headers before the body is read, TLS is the gRPC port's, and a drain turns readiness 503
first, refuses new work with 503 and Retry-After, and lets running requests finish."""

from __future__ import annotations

import gzip
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http
from http_helpers import RawRequest, infer_json, request
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config
from tls_certs import make_certs
from tritonclient.utils import InferenceServerException

LIMIT = 256 * 1024
INFER = "/v2/models/classifier/infer"
CLASSIFY = "/v2/models/classifier/classify"
IMAGE = np.zeros((1, 32, 32, 3), np.uint8)
GOOD = infer_json(IMAGE)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_repository(tmp_path_factory.mktemp("admission") / "models")


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    with RunningServer(server_config(repository, http_port=0, max_message_bytes=LIMIT)) as running:
        yield running


DROP = object()


def _input(**changes: object) -> bytes:
    """An infer body for the fixture model with fields of its input changed (DROP: removed)."""
    tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}
    tensor.update(changes)
    return json.dumps({"inputs": [{k: v for k, v in tensor.items() if v is not DROP}]}).encode()


JSON = {"Content-Type": "application/json"}
BAD_REQUESTS = [
    # (method, path, body, headers, status, a fragment of the error)
    ("GET", "/v2/models/nope", None, {}, 404, "'nope'"),
    ("GET", "/v2/models/classifier/versions/7/config", None, {}, 404, "7"),
    ("POST", "/v2/models/nope/infer", GOOD, JSON, 404, "'nope'"),
    ("GET", "/v3/whatever", None, {}, 404, "GET /v3/whatever"),
    ("DELETE", "/v2", None, {}, 405, "DELETE /v2"),
    ("POST", INFER, b"{not json", JSON, 400, "not valid JSON"),
    ("POST", INFER, b"", {}, 400, "not valid JSON"),
    ("POST", INFER, b"[1, 2]", JSON, 400, "expected a JSON object, got an array"),
    ("POST", INFER, b"\xff\xfe\x00", JSON, 400, "request body"),
    ("POST", INFER, b"[" * 100_000, JSON, 400, "request body"),
    ("POST", INFER, b'{"inputs": 3}', JSON, 400, "inputs: expected an array, got an integer"),
    ("POST", INFER, _input(shape="x"), JSON, 400, "inputs[0] ('image').shape"),
    ("POST", INFER, _input(shape=[1, -32, 32, 3]), JSON, 400, "negative dimension"),
    ("POST", INFER, _input(datatype="FLOAT"), JSON, 400, "unknown datatype 'FLOAT'"),
    ("POST", INFER, _input(data=[0] * 5), JSON, 400, "5 values in data"),
    ("POST", INFER, _input(data=["a"] * 3072), JSON, 400, "a UINT8 tensor holds integers"),
    ("POST", INFER, _input(data=[300] * 3072), JSON, 400, "out of range for UINT8"),
    ("POST", INFER, _input(data=[[0, [0]]]), JSON, 400, "not a rectangular array"),
    ("POST", INFER, _input(name="img"), JSON, 400, "img"),
    ("POST", INFER, _input(shape=[1, 3, 32, 32]), JSON, 400, "shape"),
    ("POST", INFER, _input(data=None), JSON, 400, "data: expected an array, got null"),
    ("POST", INFER, _input(data=DROP, parameters={"binary_data_size": 9}), JSON, 400, "runs past"),
    ("POST", INFER, _input(data=DROP), JSON, 400, "needs data, or parameters.binary_data_size"),
    ("POST", INFER, GOOD, {"Inference-Header-Content-Length": "x"}, 400, "not a byte count"),
    ("POST", INFER, GOOD, {"Inference-Header-Content-Length": "99999999"}, 400, "more than"),
    (
        "POST",
        INFER,
        infer_json(IMAGE, outputs=[{"name": "logits", "parameters": {"classification": 0}}]),
        JSON,
        400,
        "must be a positive integer",
    ),
    (
        "POST",
        INFER,
        infer_json(IMAGE, outputs=[{"name": "logits", "parameters": {"binary_data": "yes"}}]),
        JSON,
        400,
        "binary_data: expected a boolean",
    ),
    ("POST", INFER, infer_json(IMAGE, outputs=[{"name": "x"}]), JSON, 400, "unknown output 'x'"),
    ("POST", INFER, infer_json(IMAGE, id=7), JSON, 400, "id: expected a string"),
    ("POST", INFER, infer_json(IMAGE, parameters={"timeout": "soon"}), JSON, 400, "timeout"),
    ("POST", INFER, GOOD, {"Content-Type": "image/jpeg"}, 415, "image/jpeg is not accepted"),
    ("POST", CLASSIFY, b"\x89PNG", {"Content-Type": "text/plain"}, 415, "image/png"),
    # curl --data-binary without -H sends application/x-www-form-urlencoded
    (
        "POST",
        CLASSIFY,
        b"\xff\xd8",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "multipart/form-data",
    ),
    ("POST", CLASSIFY, b"\xff\xd8", {}, 415, "(none)"),
    ("POST", CLASSIFY, b"not an image", {"Content-Type": "image/jpeg"}, 400, "images[0]"),
    ("POST", CLASSIFY, b"", {"Content-Type": "image/jpeg"}, 400, "images[0]"),
    ("POST", f"{CLASSIFY}?top_k=x", b"\xff", {"Content-Type": "image/jpeg"}, 400, "top_k"),
    (
        "POST",
        f"{CLASSIFY}?abstention_threshold=2",
        b"\xff",
        {"Content-Type": "image/jpeg"},
        400,
        "not in [0, 1]",
    ),
    ("POST", f"{CLASSIFY}?topk=2", b"\xff", {"Content-Type": "image/jpeg"}, 400, "'topk'"),
    ("POST", CLASSIFY, b"--x--", {"Content-Type": "multipart/form-data"}, 400, "multipart"),
    (
        "POST",
        CLASSIFY,
        b'--b\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n--b--\r\n',
        {"Content-Type": "multipart/form-data; boundary=b"},
        400,
        "part 'top_k' is not a file",
    ),
    (
        "POST",
        CLASSIFY,
        b"--b\r\n\r\n",
        {"Content-Type": "multipart/form-data; boundary=b"},
        400,
        "multipart",
    ),
    ("POST", "/v2/repository/index", b'{"ready": "x"}', JSON, 400, "ready: expected a boolean"),
    ("POST", "/v2/repository/index", b"x" * 70_000, JSON, 413, "repository index"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "fragment"),
    BAD_REQUESTS,
    ids=[f"{i}-{r[4]}" for i, r in enumerate(BAD_REQUESTS)],
)
def test_bad_requests_are_answered_with_a_json_error(  # noqa: PLR0913  one row of the table
    server: RunningServer,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    fragment: str,
) -> None:
    answer = request(server.http_port, method, path, body, headers)
    assert answer.status == status, answer.body
    assert fragment in answer.error


def test_the_server_still_answers_after_the_bad_requests(server: RunningServer) -> None:
    answer = request(server.http_port, "POST", INFER, GOOD, JSON)
    assert answer.status == 200, answer.body
    assert request(server.http_port, "GET", "/v2/health/ready").status == 200


def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    server: RunningServer,
) -> None:
    raw = RawRequest(
        server.http_port,
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**9}\r\n\r\n",
    )
    try:
        answer = raw.answer()  # no byte of the body was sent
    finally:
        raw.close()
    assert answer.status == 413
    assert f"this endpoint accepts {LIMIT} (max_message_bytes)" in answer.error


def test_a_chunked_body_is_cut_off_at_the_limit(server: RunningServer) -> None:
    raw = RawRequest(
        server.http_port,
        f"POST {CLASSIFY} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        "Transfer-Encoding: chunked\r\n\r\n",
    )
    chunk = b"\0" * 65536
    try:
        for _ in range(LIMIT // len(chunk) + 2):
            raw.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        raw.send(b"0\r\n\r\n")
        answer = raw.answer()
    finally:
        raw.close()
    assert answer.status == 413
    assert "max_message_bytes" in answer.error


def test_a_compressed_body_is_capped_after_decompression(server: RunningServer) -> None:
    bomb = gzip.compress(b"\0" * (8 * LIMIT))  # a few KiB on the wire
    headers = {"Content-Type": "image/png", "Content-Encoding": "gzip"}
    answer = request(server.http_port, "POST", CLASSIFY, bomb, headers)
    assert (answer.status, len(bomb) < LIMIT) == (413, True)
    assert "max_message_bytes" in answer.error


def test_a_binary_tensor_request_of_the_binary_extension(server: RunningServer) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "UINT8",
                    "shape": [1, 32, 32, 3],
                    "parameters": {"binary_data_size": IMAGE.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    answer = request(
        server.http_port,
        "POST",
        INFER,
        header + IMAGE.tobytes(),
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert answer.status == 200, answer.body
    length = int(answer.headers["Inference-Header-Content-Length"])
    document = json.loads(answer.body[:length])
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 16}
    probabilities = np.frombuffer(answer.body[length:], "<f4")
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_token_is_checked_from_the_headers_and_health_is_exempt(
    repository: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    config = server_config(repository, http_port=0, auth_token_file=token_file)
    with RunningServer(config) as server:
        port = server.http_port
        assert request(port, "GET", "/v2/health/live").status == 200
        assert request(port, "GET", "/v2/health/ready").status == 200
        answer = request(port, "GET", "/v2/models/classifier")
        assert (answer.status, answer.error) == (401, "missing or invalid bearer token")
        wrong = request(port, "GET", "/v2", headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_metadata("classifier")
        assert refused.value.status() == "401"
        headers = {"Authorization": "Bearer s3cret"}
        tensor = triton_http.InferInput("image", [1, 32, 32, 3], "UINT8")
        result = client.infer(
            "classifier", [tensor.set_data_from_numpy(IMAGE)], headers=dict(headers)
        )
        assert result.as_numpy("probabilities").shape == (1, 4)
        # Expect: 100-continue: refused without the interim answer, so no body is sent.
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(GOOD)}\r\n"
        raw = RawRequest(port, head + "Expect: 100-continue\r\n\r\n")
        try:
            assert raw.head().startswith("HTTP/1.1 401")
        finally:
            raw.close()
        authorised = head + "Authorization: Bearer s3cret\r\n"
        raw = RawRequest(port, authorised + "Expect: 100-continue\r\n\r\n")
        try:
            assert raw.head() == "HTTP/1.1 100 Continue"
            raw.send(GOOD)
            assert raw.answer().status == 200
        finally:
            raw.close()


def test_tls_with_the_grpc_ports_certificate(repository: Path, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    config = server_config(
        repository, http_port=0, tls_cert=certs / "server.pem", tls_key=certs / "server.key"
    )
    with RunningServer(config) as server:
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        answer = request(server.http_port, "POST", INFER, GOOD, JSON, context=context)
        assert answer.status == 200, answer.body
        with pytest.raises(ConnectionError):  # plaintext to the TLS port
            request(server.http_port, "GET", "/v2/health/live")


def _partial_infer(port: int) -> RawRequest:
    """An infer request whose headers and half its body have arrived: it is in flight."""
    raw = RawRequest(
        port,
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(GOOD)}\r\n\r\n",
    )
    raw.send(GOOD[: len(GOOD) // 2])
    return raw


def _wait_until(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_requests_in_flight_beyond_the_limit_get_429_with_retry_after(repository: Path) -> None:
    config = server_config(repository, http_port=0, max_concurrent_rpcs=1)
    with RunningServer(config) as server:
        raw = _partial_infer(server.http_port)
        try:
            _wait_until(lambda: server.sample("inference_inflight_requests") == 0)
            # Admitted and its body being read: it holds the only place.
            _wait_until(lambda: server.handle.state.active == 1)
            answer = request(server.http_port, "POST", INFER, GOOD, JSON)
            assert answer.status == 429
            assert int(answer.headers["Retry-After"]) >= 1
            assert "max_concurrent_rpcs" in answer.error
            assert request(server.http_port, "GET", "/v2/health/live").status == 200
            raw.send(GOOD[len(GOOD) // 2 :])
            assert raw.answer().status == 200
        finally:
            raw.close()
        assert request(server.http_port, "POST", INFER, GOOD, JSON).status == 200


def test_drain_turns_readiness_503_then_refuses_new_work_and_finishes_running_requests(
    repository: Path,
) -> None:
    config = server_config(repository, http_port=0, drain_delay_s=0.5, grace_period_s=10.0)
    server = RunningServer(config)
    port = server.http_port
    raw = _partial_infer(port)
    try:
        _wait_until(lambda: server.handle.state.active == 1)  # the drain waits for it
        drained = server.submit(server.handle.drain())
        _wait_until(lambda: request(port, "GET", "/v2/health/ready").status == 503)
        assert request(port, "GET", "/v2/health/live").status == 200
        _wait_until(lambda: server.handle.state.rejecting)
        refused = request(port, "POST", INFER, GOOD, JSON)
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.headers["Connection"] == "close"
        assert "shutting down" in refused.error
        assert not drained.done()
        raw.send(GOOD[len(GOOD) // 2 :])
        assert raw.answer().status == 200
        drained.result(timeout=15)
    finally:
        raw.close()
        server.stop()
    with pytest.raises(ConnectionError):
        request(port, "GET", "/v2/health/live")
