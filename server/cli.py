"""The ``server`` command: parse the settings, then hand over to server.app.serve."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from collections.abc import Sequence

from server.config import ServerConfig, load_config
from server.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``server`` console script; returns the exit code."""
    try:
        config = load_config(argv)
        check_ports_free(config)
    except ConfigError as error:
        print(f"server: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from server.app import serve  # after logging is set up; imports onnxruntime

    try:
        return asyncio.run(serve(config))
    except ConfigError as error:
        print(f"server: error: {error}", file=sys.stderr)
        return 2


def check_ports_free(config: ServerConfig) -> None:
    """Refuse a port another process listens on, before anything is loaded or logged.

    gRPC reports a taken port as a RuntimeError among C-core log lines; this names the
    setting in one line. A port taken between this check and the bind still fails there.

    Raises:
        ConfigError: naming the setting, the address and the reason.
    """
    metrics_host = config.metrics_host if config.metrics_host is not None else config.host
    listeners = (
        ("grpc_port", config.host, config.grpc_port),
        ("http_port", config.host, config.http_port),
        ("metrics_port", metrics_host, config.metrics_port),
        ("health_port", config.host, config.health_port),
    )
    for setting, host, port in listeners:
        if port > 0:  # 0: the OS picks a free one; -1: off
            _check_port_free(setting, host, port)


def _check_port_free(setting: str, host: str, port: int) -> None:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            # As gRPC and http.server bind: SO_REUSEADDR (only a listening socket conflicts),
            # and an IPv6 address dual-stack.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(sockaddr)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ConfigError(f"{setting}: {address} is already in use") from None
        raise ConfigError(f"{setting}: cannot listen on {address}: {error.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
