"""Checkpoints: the dict layout of docs/architecture.md, atomic writes, finding one to resume.

A checkpoint's position ``(phase, epoch, step)`` says where training stands: ``step`` batches
of 1-based ``epoch`` of ``phase`` are done (``step == -1``: the epoch is finished and
evaluated). ``global_epoch`` counts finished epochs over all phases.
"""

from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.fsutil import atomic_write_bytes
from trainer.weights import CHECKPOINT_FORMAT

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
EPOCH_DONE = -1


@dataclass(frozen=True)
class Position:
    """Where a run stands; ordered so a later position compares greater."""

    phase_index: int
    epoch: int
    step: int

    def key(self) -> tuple[int, int, float]:
        return (
            self.phase_index,
            self.epoch,
            float("inf") if self.step == EPOCH_DONE else self.step,
        )


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from (dropout, MixUp, sampler seeds), as plain values."""
    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": list(_tuple_to_list(random.getstate())),
    }


def _tuple_to_list(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_tuple_to_list(v) for v in value]
    return value


def _list_to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_list_to_tuple(v) for v in value)
    return value


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the RNG states saved by ``rng_state``."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    random.setstate(_list_to_tuple(state["python"]))


def serialize(checkpoint: dict[str, Any]) -> bytes:
    """The bytes ``torch.save`` writes, so one serialisation can go to several files."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def save(directory: Path, data: bytes, *, best: bool) -> None:
    """Write ``last.pt`` (and ``best.pt`` when ``best``) atomically."""
    atomic_write_bytes(directory / LAST, data)
    if best:
        atomic_write_bytes(directory / BEST, data)


def load(path: Path) -> dict[str, Any]:
    """Load and check a checkpoint of this trainer.

    Raises:
        ValueError: unreadable, truncated, or not a checkpoint of this format.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} file")
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {checkpoint.get('format_version')}, "
            f"expected {FORMAT_VERSION}"
        )
    return checkpoint


PHASE_ORDER = {"head": 0, "finetune": 1}


def position(checkpoint: dict[str, Any]) -> Position:
    """The checkpoint's position."""
    return Position(
        PHASE_ORDER[checkpoint["phase"]], int(checkpoint["epoch"]), int(checkpoint["step"])
    )


def find_resumable(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The valid checkpoint furthest along in ``directory``; corrupt ones are logged and skipped."""
    found: list[tuple[Path, dict[str, Any]]] = []
    for name in (LAST, BEST):
        path = directory / name
        if not path.exists():
            continue
        try:
            found.append((path, load(path)))
        except ValueError as exc:
            log.warning("skipping checkpoint: %s", exc)
    if not found:
        return None
    return max(found, key=lambda item: position(item[1]).key())
