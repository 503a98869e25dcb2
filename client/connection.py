"""Channel construction shared by the sync and asyncio clients: TLS, mTLS and bearer tokens.

Nothing here imports onnxruntime or torch; the client runs in images that carry neither.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import grpc

from contracts.token_file import TokenFileError, parse_tokens

# The server's default receive limit is 64 MiB; a client limited to gRPC's 4 MiB default would
# reject ordinary batched responses, so the client matches the server.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ClientConfigError(ValueError):
    """The connection options are inconsistent or name files that cannot be read."""


@dataclasses.dataclass(frozen=True)
class ConnectionOptions:
    """How to reach a server.

    Attributes:
        target: ``HOST:PORT`` of the gRPC endpoint.
        tls: use TLS (implied by any of the certificate options).
        ca_cert: PEM file with the CA that signed the server's certificate; ``None`` uses the
            system roots.
        client_cert: PEM client certificate for mutual TLS (needs ``client_key``).
        client_key: PEM private key of ``client_cert``.
        server_name: overrides the name checked against the server certificate (for tests and
            for reaching a server by IP address).
        token: bearer token sent as ``authorization: Bearer <token>`` on every call.
        timeout_s: deadline of each call; ``None`` waits indefinitely.
        max_message_bytes: send and receive limit of the channel.
        channel_credentials: ready-made gRPC channel credentials (tritonclient's ``creds``);
            they replace the certificate options.
        allow_insecure_token: send ``token`` without TLS to a host other than this one (a
            trusted network such as a pod's sidecar); refused otherwise, since anyone on the
            path could read and replay it.
    """

    target: str
    tls: bool = False
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None
    token: str | None = None
    timeout_s: float | None = 30.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    channel_credentials: grpc.ChannelCredentials | None = None
    allow_insecure_token: bool = False

    def __post_init__(self) -> None:
        host, sep, port = self.target.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ClientConfigError(f"target must be HOST:PORT, got {self.target!r}")
        if (self.client_cert is None) != (self.client_key is None):
            raise ClientConfigError("client_cert and client_key must be given together")
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n")):
            raise ClientConfigError("token must be a non-empty single line")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ClientConfigError(f"timeout_s must be positive, got {self.timeout_s}")
        cleartext = self.token is not None and not self.uses_tls
        if cleartext and not self.allow_insecure_token and not is_loopback(host):
            raise ClientConfigError(
                f"refusing to send the bearer token in cleartext to {host}: use TLS "
                "(--tls or --ca-cert), or --allow-insecure-token on a trusted network"
            )

    @property
    def uses_tls(self) -> bool:
        return (
            self.tls
            or self.ca_cert is not None
            or self.client_cert is not None
            or self.channel_credentials is not None
        )

    def channel_options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata; a token travels in metadata so it also works without TLS."""
        if self.token is None:
            return ()
        return (("authorization", f"Bearer {self.token}"),)

    def credentials(self) -> grpc.ChannelCredentials:
        if self.channel_credentials is not None:
            return self.channel_credentials
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca_cert, "ca_cert"),
            private_key=_read_pem(self.client_key, "client_key"),
            certificate_chain=_read_pem(self.client_cert, "client_cert"),
        )


# tritonclient's keyword names -> ours, so code written for tritonclient keeps its habits.
_TRITONCLIENT_NAMES = {
    "url": "target",
    "ssl": "tls",
    "root_certificates": "ca_cert",
    "private_key": "client_key",
    "certificate_chain": "client_cert",
    "creds": "channel_credentials",
}
# tritonclient keywords that change nothing here (logging, keepalive and channel tuning).
_IGNORED = frozenset({"verbose", "keepalive_options", "channel_args"})
_PATH_FIELDS = frozenset({"ca_cert", "client_cert", "client_key"})


def resolve_options(target: ConnectionOptions | str, **options: object) -> ConnectionOptions:
    """Connection options from ``"HOST:PORT"`` and keywords, or from ready-made options.

    Keywords are ``ConnectionOptions``' fields; tritonclient's names (``ssl``,
    ``root_certificates``, ``private_key``, ``certificate_chain``, ``creds``) are accepted as
    aliases and its ``verbose``, ``keepalive_options`` and ``channel_args`` are ignored.

    Raises:
        ClientConfigError: an unknown keyword or an inconsistent combination.
    """
    fields = {f.name for f in dataclasses.fields(ConnectionOptions)}
    values: dict[str, object] = {}
    for key, value in options.items():
        if key in _IGNORED:
            continue
        name = _TRITONCLIENT_NAMES.get(key, key)
        if name not in fields or name == "target":
            raise ClientConfigError(f"unknown connection option {key!r}")
        values[name] = Path(str(value)) if name in _PATH_FIELDS and value is not None else value
    if isinstance(target, ConnectionOptions):
        return dataclasses.replace(target, **values)  # type: ignore[arg-type]
    return ConnectionOptions(target=target, **values)  # type: ignore[arg-type]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def read_token_file(path: Path) -> str:
    """The bearer token to send from a token file: its last token (``contracts.token_file``:
    one per line, ``#`` comments; the server's file lists the newest last while it rotates)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClientConfigError(f"cannot read token file {path}: {exc.strerror}") from exc
    try:
        return parse_tokens(text)[-1]
    except TokenFileError as exc:
        raise ClientConfigError(f"token file {path}: {exc}") from None


def _read_pem(path: Path | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ClientConfigError(f"cannot read {name} file {path}: {exc.strerror}") from exc


def create_channel(options: ConnectionOptions) -> grpc.Channel:
    """A blocking channel for the synchronous client."""
    if options.uses_tls:
        return grpc.secure_channel(
            options.target, options.credentials(), options=options.channel_options()
        )
    return grpc.insecure_channel(options.target, options=options.channel_options())


def create_aio_channel(options: ConnectionOptions) -> grpc.aio.Channel:
    """An asyncio channel; must be created while the event loop that uses it is running."""
    if options.uses_tls:
        return grpc.aio.secure_channel(
            options.target, options.credentials(), options=options.channel_options()
        )
    return grpc.aio.insecure_channel(options.target, options=options.channel_options())
