"""``metrics.jsonl`` (one JSON line per epoch) and ``summary.json``, written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from contracts.atomic_files import atomic_write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """The per-epoch metrics file. A resumed run first drops lines past its checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lines: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    self.lines.append(json.loads(line))

    def truncate(self, global_epoch: int) -> None:
        """Keep only epochs up to ``global_epoch`` (those the checkpoint includes)."""
        self.lines = [m for m in self.lines if int(m.get("global_epoch", 0)) <= global_epoch]
        self._write()

    def append(self, record: dict[str, Any]) -> None:
        """Add one epoch's record and rewrite the file atomically."""
        self.lines.append(_clean(record))
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in self.lines))


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """``summary.json``, atomically."""
    atomic_write_text(path, json.dumps(_clean(summary), indent=2) + "\n")
