"""Reading a JSON object from a file another program wrote, within a size bound.

The files are small by design (a model's metadata, a capture's sidecar); a larger one is a
mistake or a hostile file, and reading it whole first would cost the memory the bound saves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UnreadableJson(ValueError):  # noqa: N818 (names of the domain)
    """A file that cannot be read, is too large, or does not hold one JSON object."""


def read_json_object(path: Path, *, max_bytes: int) -> dict[str, Any]:
    """The JSON object in ``path``, read only when it is at most ``max_bytes`` long.

    Raises:
        UnreadableJson: naming the problem (not the path: the caller's error names the file).
    """
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise UnreadableJson(error.strerror or str(error)) from None
    if len(data) > max_bytes:
        raise UnreadableJson(f"larger than {max_bytes} bytes")
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UnreadableJson("not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise UnreadableJson(f"not JSON ({error})") from None
    except RecursionError:
        raise UnreadableJson("JSON nested too deeply") from None
    if not isinstance(document, dict):
        raise UnreadableJson(f"expected a JSON object, found {type(document).__name__}")
    return document
