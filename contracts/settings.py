"""How a setting's text (a flag, an environment variable, a YAML scalar) becomes a value.

The trainer and the server read the same words the same way: ``true/false``, ``yes/no``,
``on/off``, ``1/0`` for booleans, and ``none``/``null``/empty for "not set".
"""

from __future__ import annotations

import argparse
from typing import Any

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
UNSET_WORDS = frozenset({"", "none", "null"})


def is_unset(value: Any) -> bool:
    """None, or a string that means "not set"."""
    return value is None or (isinstance(value, str) and value.strip().lower() in UNSET_WORDS)


def parse_bool(value: Any) -> bool:
    """A boolean from a bool or one of the words above.

    Raises:
        ValueError: for anything else, naming the accepted words.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"expected true/false, yes/no, on/off or 1/0, got {value!r}")


def parse_int(value: Any) -> int:
    """An integer; refuses booleans and fractional numbers instead of truncating them."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def parse_float(value: Any) -> float:
    """A number; refuses booleans."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def positive_int_argument(text: str) -> int:
    """An argparse ``type`` for counts: a positive integer, else a usage error naming the text."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
