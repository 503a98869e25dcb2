"""The server's certificate, key and client CA, read again when they change.

cert-manager renews a certificate into its Secret and Kubernetes swaps the mounted files; new
handshakes then get the new certificate with no restart. The gRPC port asks for the files at
each handshake (``grpc.dynamic_ssl_server_credentials``, in ``grpc_server``); the HTTP/REST
port's ``ssl.SSLContext`` is reloaded in place by a task that looks every second
(``ReloadingSslContext``). Either way a pair that does not load (a key that is not the
certificate's, a file half written) is refused and the last good one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from server.config import ServerConfig
from server.errors import ConfigError
from server.transport.file_reload import CHECK_INTERVAL_S, ReloadingFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """Where the PEM files are (``tls_cert``, ``tls_key``, ``tls_client_ca``)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def of(cls, config: ServerConfig) -> TlsFiles | None:
        """The configured files, or None for plaintext."""
        if config.tls_cert is None or config.tls_key is None:
            return None
        return cls(config.tls_cert, config.tls_key, config.tls_client_ca)

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


@dataclass(frozen=True)
class TlsMaterial:
    """The files' contents, checked to load together."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def read_material(files: TlsFiles) -> TlsMaterial:
    """The files' bytes, after a scratch context has loaded them (the key is the
    certificate's, the CA bundle parses).

    Raises:
        OSError: a file cannot be read, or ssl.SSLError: they do not load together.
    """
    cert, key = files.cert.read_bytes(), files.key.read_bytes()
    client_ca = files.client_ca.read_bytes() if files.client_ca else None
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    scratch.load_cert_chain(files.cert, files.key)
    if files.client_ca is not None:
        scratch.load_verify_locations(cafile=files.client_ca)
    return TlsMaterial(cert, key, client_ca)


def _start_error(error: OSError) -> ConfigError:
    if isinstance(error, ssl.SSLError):
        return ConfigError(f"TLS files: {error}")
    return ConfigError(f"TLS file {error.filename}: {error.strerror}")


def watch_material(
    files: TlsFiles, min_interval_s: float = CHECK_INTERVAL_S
) -> ReloadingFiles[TlsMaterial]:
    """The files' material, re-read when they change.

    Raises:
        ConfigError: at start, a file cannot be read or they do not load together.
    """
    try:
        return ReloadingFiles(
            "TLS certificate",
            files.paths,
            lambda: read_material(files),
            min_interval_s=min_interval_s,
        )
    except OSError as error:
        raise _start_error(error) from None


class ReloadingSslContext:
    """The HTTP/REST listener's server context (client certificates required with a client
    CA), whose certificate chain is loaded again in place when the files change: an
    ``SSLContext``'s chain applies to the handshakes that start after it is loaded.

    A client CA that changes is added to the trusted ones; one removed from the file stays
    trusted on this port until a restart (OpenSSL's store only grows).
    """

    def __init__(self, files: TlsFiles) -> None:
        """
        Raises:
            ConfigError: a file cannot be read or they do not load together.
        """
        self.files = files
        # The watch task paces the checks itself.
        self._material = watch_material(files, min_interval_s=0.0)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.set_alpn_protocols(["http/1.1"])
        try:
            self._load()
        except OSError as error:
            raise _start_error(error) from None
        if files.client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED

    def _load(self) -> None:
        self.context.load_cert_chain(self.files.cert, self.files.key)
        if self.files.client_ca is not None:
            self.context.load_verify_locations(cafile=self.files.client_ca)

    def refresh(self) -> bool:
        """Load the files again if they changed (and load together); True when loaded."""
        if not self._material.refresh():
            return False
        try:
            self._load()
        except OSError as error:  # replaced again since they were checked: the next look
            log.warning("TLS certificate: reloading the HTTP/REST context failed: %s", error)
            return False
        return True

    async def watch(self, interval_s: float = CHECK_INTERVAL_S) -> None:
        """Look at the files every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            self.refresh()
