"""The bearer-token file the server checks calls against and a client sends from.

One token per line; blank lines and lines starting with ``#`` are ignored. The server accepts
every token in the file, so a token is rotated without a refused call: add the new token on a
line after the old one, move the clients, remove the old one. A client that reads the same
file (a pod mounting the server's Secret) sends the last token, the newest by that procedure.
"""

from __future__ import annotations


class TokenFileError(ValueError):
    """A token file's text holds no token, or a line that is not one token."""


def parse_tokens(text: str) -> tuple[str, ...]:
    """The tokens of a token file's text, in file order, without repeats.

    Raises:
        TokenFileError: no token at all, or a line holding whitespace inside (two tokens on a
            line would otherwise be one token nobody can send).
    """
    tokens: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(character.isspace() for character in token):
            raise TokenFileError(f"line {number} holds whitespace; write one token per line")
        tokens[token] = None
    if not tokens:
        raise TokenFileError("no token in it (blank lines and # comments are ignored)")
    return tuple(tokens)
