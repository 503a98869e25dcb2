"""The token file holds a set of tokens and is read again when it changes: a token is rotated
on a running server (add the new one, both work; remove the old one, it is refused) on the
gRPC and the HTTP/REST port alike, and a file that becomes unusable keeps the last good set."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
import pytest
from http_helpers import request
from repository_factory import make_model_repository
from server_harness import RunningServer, seconds_until, server_config

from client.connection import ClientConfigError, read_token_file
from contracts.token_file import parse_tokens
from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc
from server.errors import ConfigError
from server.transport.bearer_tokens import BearerTokens

# A change is looked for at most once a second (file_reload.CHECK_INTERVAL_S); this is the
# bound the tests allow for it to be seen.
SEEN_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_repository(tmp_path_factory.mktemp("tokens") / "models")


def test_parse_tokens() -> None:
    text = "# rotated 2026-01-01\n\n  old-token  \nnew-token\n# retired: older\nold-token\n"
    assert parse_tokens(text) == ("old-token", "new-token")
    assert parse_tokens("single\n") == ("single",)  # the one-token file of before
    with pytest.raises(ValueError, match="no token"):
        parse_tokens("# only a comment\n\n")
    with pytest.raises(ValueError, match="line 2 holds whitespace"):
        parse_tokens("a\nb c\n")


def test_an_unusable_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth_token_file .*missing"):
        BearerTokens.from_file(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="no token"):
        BearerTokens.from_file(empty)


def test_a_client_sends_the_last_token_of_the_servers_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("# rotating\nold\nnew\n")
    assert read_token_file(path) == "new"
    path.write_text("\n# nothing\n")
    with pytest.raises(ClientConfigError, match="no token"):
        read_token_file(path)


def test_bearer_tokens_accept_only_their_own() -> None:
    tokens = BearerTokens.fixed("a", "b")
    assert tokens.accepts(b"Bearer a") and tokens.accepts(b"Bearer b")
    assert not tokens.accepts(b"Bearer c")
    assert not tokens.accepts(b"a")
    assert not tokens.accepts(b"")


class Callers:
    """One token presented to both ports of a running server."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(server.target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def grpc_accepts(self, token: str) -> bool:
        metadata = (("authorization", f"Bearer {token}"),)
        try:
            return self.stub.ServerReady(
                pb.ServerReadyRequest(), timeout=10, metadata=metadata
            ).ready
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED, error
            return False

    def http_accepts(self, token: str) -> bool:
        answer = request(
            self.server.http_port, "GET", "/v2", headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status in (200, 401), answer
        return answer.status == 200

    def accepts(self, token: str) -> tuple[bool, bool]:
        return self.grpc_accepts(token), self.http_accepts(token)


def test_token_rotation_on_a_running_server(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="server.transport.file_reload")
    token_file = tmp_path / "token"
    token_file.write_text("old\n")
    config = server_config(repository, http_port=0, auth_token_file=token_file)
    with RunningServer(config) as server:
        callers = Callers(server)
        try:
            assert callers.accepts("old") == (True, True)
            assert callers.accepts("new") == (False, False)

            token_file.write_text("old\nnew\n")  # 1. the new token beside the old one
            added = seconds_until(
                lambda: callers.accepts("new") == (True, True), SEEN_WITHIN_S, "the new token"
            )
            assert callers.accepts("old") == (True, True)

            token_file.write_text("# old retired\nnew\n")  # 2. the clients moved; old out
            removed = seconds_until(
                lambda: callers.accepts("old") == (False, False), SEEN_WITHIN_S, "the removal"
            )
            assert callers.accepts("new") == (True, True)

            # 3. A file that becomes unusable keeps the last good set, logged once.
            token_file.write_text("# emptied by mistake\n")
            time.sleep(2.2)  # two checks
            assert callers.accepts("new") == (True, True)
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1, warnings
            assert "auth_token_file" in warnings[0] and "no token" in warnings[0]
        finally:
            callers.channel.close()
    # Each is seen at the first check after the write: within the 1 s interval, plus a call.
    assert added.within(1.0) and removed.within(1.0), (added, removed)
