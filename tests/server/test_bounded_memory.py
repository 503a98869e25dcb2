"""What refused requests cost the server, read from a real server process's peak memory.

Each case runs against a fresh server (freed memory that an earlier case left to the
allocator could otherwise hide a later case's cost) and is held to PEAK_LIMIT: the issue's
budget, against +546 to +744 MiB before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from repository_factory import make_model_repository
from rss_server import MIB, ServerProcess
from wire_messages import (
    CLASSIFY,
    MODEL_INFER,
    call_raw,
    empty_bytes_contents,
    empty_images,
    field,
    infer_request,
    input_tensor,
    unlimited_channel,
)

PEAK_LIMIT = 200 * MIB
TOKEN = "s3cret"
AUTHORIZED = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_repository(tmp_path_factory.mktemp("memory") / "models")


@pytest.fixture
def server(repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    # 64 MiB messages, so that every body below reaches the server's own code.
    settings = {
        "auth_token_file": str(token_file),
        "max_message_bytes": 64 * MIB,
        "warmup_batch_sizes": [1],
    }
    with ServerProcess(repository, **settings) as process:
        yield process


def _codes(futures: list[grpc.Future]) -> list[grpc.StatusCode]:
    codes = []
    for future in futures:
        error = future.exception()
        codes.append(grpc.StatusCode.OK if error is None else error.code())
    return codes


def _peak_growth(
    server: ServerProcess, send: Callable[[grpc.Channel], list[grpc.Future]]
) -> tuple[int, list[grpc.StatusCode]]:
    """The server's peak memory growth while ``send``'s calls ran, and their status codes."""
    before = server.reset_peak()
    with unlimited_channel(server.target) as channel:
        codes = _codes(send(channel))
    return server.peak() - before, codes


def test_unauthenticated_bodies_are_not_received(server: ServerProcess) -> None:
    body = infer_request("classifier", [input_tensor(shape=[1])], raw=[b"\x01" * 60_000_000])

    def send(channel: grpc.Channel) -> list[grpc.Future]:
        return [call_raw(channel, MODEL_INFER, body) for _ in range(8)]

    growth, codes = _peak_growth(server, send)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 8
    assert growth <= PEAK_LIMIT, f"8 refused 60 MB calls cost {growth / MIB:.0f} MiB"


def test_typed_bytes_to_a_missing_model_are_not_converted(server: ServerProcess) -> None:
    count = (31 * MIB) // 2
    contents = empty_bytes_contents(count)
    body = infer_request("missing", [input_tensor("x", "BYTES", [count], contents)])
    assert len(body) >= 31 * MIB

    def send(channel: grpc.Channel) -> list[grpc.Future]:
        return [call_raw(channel, MODEL_INFER, body, AUTHORIZED)]

    growth, codes = _peak_growth(server, send)
    assert codes == [grpc.StatusCode.NOT_FOUND]
    assert growth <= PEAK_LIMIT, f"a 31 MiB BYTES request cost {growth / MIB:.0f} MiB"


def test_sixteen_million_empty_images_are_counted_before_parsing(server: ServerProcess) -> None:
    body = empty_images(16 * MIB)

    def send(channel: grpc.Channel) -> list[grpc.Future]:
        return [call_raw(channel, CLASSIFY, body, AUTHORIZED)]

    growth, codes = _peak_growth(server, send)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT]
    assert growth <= PEAK_LIMIT, f"16 M empty images cost {growth / MIB:.0f} MiB"


def test_a_huge_shape_is_refused_before_parsing(server: ServerProcess) -> None:
    # 31 M one-byte dimensions: 8 bytes each once parsed.
    tensor = field(1, b"x") + field(2, b"UINT8") + field(3, b"\x01" * (31 * MIB))
    body = infer_request("classifier", [tensor])

    def send(channel: grpc.Channel) -> list[grpc.Future]:
        return [call_raw(channel, MODEL_INFER, body, AUTHORIZED)]

    growth, codes = _peak_growth(server, send)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT]
    assert growth <= PEAK_LIMIT, f"a 31 M-dimension shape cost {growth / MIB:.0f} MiB"
