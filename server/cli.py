"""The ``server`` command: parse the settings, then hand over to server.app.serve."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from server.config import load_config
from server.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``server`` console script; returns the exit code."""
    try:
        config = load_config(argv)
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


if __name__ == "__main__":
    sys.exit(main())
