"""Plain HTTP clients for the HTTP/REST tests: ``http.client`` for whole requests, a raw socket
for requests sent in pieces (headers first, the body later or never)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        """The ``{"error": ...}`` message; fails the test when the body is anything else."""
        assert self.headers.get_content_type() == "application/json", self.headers
        document = self.json()
        assert list(document) == ["error"], document
        assert isinstance(document["error"], str)
        return str(document["error"])


def request(  # noqa: PLR0913  one keyword per part of the request
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Answer:
    if context is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=30
        )
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def infer_json(images: np.ndarray, **extra: Any) -> bytes:
    """A JSON-only infer body for the fixture model's ``image`` input."""
    document = {
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": list(images.shape),
                "data": images.reshape(-1).tolist(),
            }
        ],
        **extra,
    }
    return json.dumps(document).encode()


class RawRequest:
    """A request written to a socket in pieces."""

    def __init__(self, port: int, head: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(head.encode("latin-1"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def head(self) -> str:
        """The status line and headers of what the server sent first (an interim 100
        Continue, or the final answer, whose body is then dropped)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
        return data.partition(b"\r\n\r\n")[0].decode("latin-1")

    def answer(self) -> Answer:
        """The final response (http.client skips an interim 100 Continue itself)."""
        response = http.client.HTTPResponse(self.sock)
        response.begin()
        return Answer(response.status, response.headers, response.read())

    def close(self) -> None:
        self.sock.close()
