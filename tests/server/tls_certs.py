"""Throwaway CAs and certificates made with openssl: by default a CA, a server certificate for
127.0.0.1/localhost and a client certificate; ``make_ca``/``make_leaf`` make more (another
CA to rotate to, clients with other names)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SERVER_NAMES = "DNS:localhost,IP:127.0.0.1"
_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str = "ca") -> Path:
    """``NAME.pem``/``NAME.key`` in ``directory``: a self-signed CA, CN ``test-NAME``, valid
    one day; returns the certificate's path."""
    _openssl("req", "-x509", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "1", "-subj", f"/CN=test-{name}", cwd=directory)  # fmt: skip
    return directory / f"{name}.pem"


def make_leaf(
    directory: Path,
    name: str,
    alt_names: str | None = SERVER_NAMES,
    *,
    ca: str = "ca",
    common_name: str | None = None,
) -> tuple[Path, Path]:
    """``NAME.pem``/``NAME.key`` in ``directory``, signed by the CA ``ca`` there.

    Args:
        alt_names: the subjectAltName value (``DNS:a,URI:spiffe://x/y``); None: no SAN at all.
        common_name: the subject's CN (default: ``name``).

    Returns:
        the certificate's and the key's paths.
    """
    _openssl("req", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={common_name or name}", cwd=directory)  # fmt: skip
    extension: tuple[str, ...] = ()
    if alt_names is not None:
        (directory / f"{name}.ext").write_text(f"subjectAltName={alt_names}\n")
        extension = ("-extfile", f"{name}.ext")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", *extension,
             cwd=directory)  # fmt: skip
    return directory / f"{name}.pem", directory / f"{name}.key"


def make_certs(directory: Path) -> Path:
    """``ca.pem``, ``server.pem``/``server.key`` and ``client.pem``/``client.key`` in
    ``directory`` (valid one day); returns ``directory``."""
    make_ca(directory)
    for name in ("server", "client"):
        make_leaf(directory, name)
    return directory
