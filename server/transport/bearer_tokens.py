"""The bearer tokens a caller may present, from ``auth_token_file``, re-read when it changes.

The file holds a set of tokens (``contracts.token_file``: one per line, blank lines and ``#``
comments ignored), so a token is rotated without downtime: add the new one, move the clients
to it, remove the old one. Both transports (the gRPC gate and the HTTP admission) ask the
same object, which looks at the file at most once a second (``file_reload``).
"""

from __future__ import annotations

import hmac
from pathlib import Path

from contracts.token_file import parse_tokens
from server.errors import ConfigError
from server.transport.file_reload import ReloadingFiles

SCHEME = b"Bearer "


def _read_expected(path: Path) -> frozenset[bytes]:
    return frozenset(SCHEME + token.encode() for token in parse_tokens(path.read_text()))


class BearerTokens:
    """Whether an ``authorization`` value carries one of the tokens."""

    def __init__(self, source: ReloadingFiles[frozenset[bytes]] | frozenset[bytes]) -> None:
        self._source = source

    @classmethod
    def from_file(cls, path: Path) -> BearerTokens:
        """The tokens of ``path``, re-read when it changes.

        Raises:
            ConfigError: the file cannot be read or holds no token (at start; later failures
                keep the tokens last read, logged once).
        """
        try:
            return cls(ReloadingFiles("auth_token_file", [path], lambda: _read_expected(path)))
        except OSError as error:
            raise ConfigError(f"auth_token_file {path}: {error.strerror}") from None
        except ValueError as error:
            raise ConfigError(f"auth_token_file {path}: {error}") from None

    @classmethod
    def fixed(cls, *tokens: str) -> BearerTokens:
        """These tokens, never re-read (tests, embedding)."""
        return cls(frozenset(SCHEME + token.encode() for token in tokens))

    @property
    def count(self) -> int:
        """Tokens accepted now."""
        return len(self._expected())

    def _expected(self) -> frozenset[bytes]:
        source = self._source
        if isinstance(source, ReloadingFiles):
            source.refresh()
            return source.value
        return source

    def accepts(self, authorization: bytes) -> bool:
        """Whether ``authorization`` is ``Bearer <one of the tokens>``.

        Every token is compared in constant time, none skipped, so the answer's timing says
        nothing about which token came close.
        """
        accepted = False
        for expected in self._expected():
            accepted |= hmac.compare_digest(authorization, expected)
        return accepted
