"""The server never imports torch or the trainer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_server_imports_neither_torch_nor_trainer() -> None:
    code = (
        "import sys, server.app, server.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer'))\n"
        "print(bad)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
