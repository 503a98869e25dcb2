"""The ``server`` console script: checks the ``serve`` extra, then runs the command line."""

from __future__ import annotations

from contracts.extras import require_extra

# What `server` imports beyond the base install (the `serve` extra in pyproject.toml).
SERVE_MODULES = ("onnxruntime", "grpc_health", "grpc_reflection", "aiohttp", "prometheus_client")


def main() -> int:
    """Entry point of the ``server`` console script; returns the exit code."""
    require_extra("server", "serve", SERVE_MODULES)
    from server.cli import main as run_cli

    return run_cli()
