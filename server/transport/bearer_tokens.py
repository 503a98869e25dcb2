"""The bearer tokens a caller may present, from ``auth_token_file``, re-read when it changes.

The file holds a set of tokens, one per line (blank lines and ``#`` comments ignored), so a
token is rotated without downtime: add the new one, move the clients to it, remove the old
one. Both transports (the gRPC gate and the HTTP admission) ask the same object, which looks
at the file at most once a second (``file_reload``).
"""

from __future__ import annotations

import hmac
from pathlib import Path

from server.errors import ConfigError
from server.transport.file_reload import ReloadingFiles

SCHEME = b"Bearer "


def parse_tokens(text: str) -> frozenset[str]:
    """The tokens of a token file's text.

    Raises:
        ValueError: no token at all, or a line holding whitespace inside (two tokens on a line
            would otherwise be one token nobody can send).
    """
    tokens = set()
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(character.isspace() for character in token):
            raise ValueError(f"line {number} holds whitespace; write one token per line")
        tokens.add(token)
    if not tokens:
        raise ValueError("no token in it (blank lines and # comments are ignored)")
    return frozenset(tokens)


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
