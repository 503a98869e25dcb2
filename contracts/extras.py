"""The distribution's extras, as its console scripts need them.

``pip install finetune-serve`` installs the ``trainer``, ``server`` and ``client`` commands but
only the client's dependencies; the trainer needs the ``train`` extra and the server the
``serve`` extra. A command whose extra is missing says so in one line and exits 2, instead of
dying in an import traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

DISTRIBUTION = "finetune-serve"
USAGE_EXIT_CODE = 2


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The top-level modules of ``modules`` that cannot be found (nothing is imported)."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def require_extra(program: str, extra: str, modules: Sequence[str]) -> None:
    """Exit 2 with an install hint when any of ``modules`` is missing."""
    missing = missing_modules(modules)
    if missing:
        print(
            f"{program}: error: the '{extra}' extra is not installed (missing: "
            f"{', '.join(missing)}); install it with: pip install '{DISTRIBUTION}[{extra}]'",
            file=sys.stderr,
        )
        raise SystemExit(USAGE_EXIT_CODE)
