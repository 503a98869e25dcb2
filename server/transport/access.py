"""Who may call, beyond what TLS already checked: the bearer tokens and, with mTLS, the names
a client certificate must carry (``tls_client_allowed_names``).

The CA (``tls_client_ca``) says a certificate is genuine; the allow-list says which of the
CA's certificates may call this server, so one CA can sign clients of several services. A
certificate's names are its subject alternative names of type DNS and URI (a SPIFFE ID is a
URI), or its common name when it has no subject alternative name at all, as RFC 6125 reads a
server's. Both transports ask the same ``Access``; health is exempt on both, as it is from
the token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.config import ServerConfig
from server.errors import Unauthenticated
from server.transport.bearer_tokens import BearerTokens

TOKEN_REFUSAL = "missing or invalid bearer token"
NAME_REFUSAL = "client certificate not allowed (tls_client_allowed_names)"


def names_from_auth_context(auth: Mapping[str, Sequence[bytes]]) -> frozenset[str]:
    """A gRPC peer's names, from ``ServicerContext.auth_context()``."""
    if auth.get("x509_subject_alternative_name"):
        values = [*auth.get("peer_dns", ()), *auth.get("peer_uri", ())]
    else:
        values = list(auth.get("x509_common_name", ()))
    return frozenset(value.decode("utf-8", "replace") for value in values)


def names_from_peercert(peercert: Mapping[str, Any] | None) -> frozenset[str]:
    """An HTTPS peer's names, from ``SSLObject.getpeercert()`` (empty without a certificate)."""
    if not peercert:
        return frozenset()
    alternatives = peercert.get("subjectAltName", ())
    if alternatives:
        return frozenset(value for kind, value in alternatives if kind in ("DNS", "URI"))
    return frozenset(
        value
        for relative_name in peercert.get("subject", ())
        for key, value in relative_name
        if key == "commonName"
    )


@dataclass(frozen=True)
class Access:
    """The checks every call but health passes (None: that check is off)."""

    tokens: BearerTokens | None = None
    client_names: frozenset[str] | None = None

    @classmethod
    def of(cls, config: ServerConfig) -> Access:
        """The configured checks.

        Raises:
            ConfigError: the token file cannot be read or holds no token.
        """
        tokens = (
            BearerTokens.from_file(config.auth_token_file)
            if config.auth_token_file is not None
            else None
        )
        names = frozenset(config.tls_client_allowed_names) or None
        return cls(tokens, names)

    @property
    def checks_names(self) -> bool:
        return self.client_names is not None

    def token_refusal(self, authorization: bytes) -> Unauthenticated | None:
        """Why a call's ``authorization`` value (empty when absent) is refused, or None."""
        if self.tokens is not None and not self.tokens.accepts(authorization):
            return Unauthenticated(TOKEN_REFUSAL)
        return None

    def name_refusal(self, names: frozenset[str]) -> Unauthenticated | None:
        """Why a client certificate with these names is refused, or None."""
        if self.client_names is not None and self.client_names.isdisjoint(names):
            return Unauthenticated(NAME_REFUSAL)
        return None
