"""After phase 2: WiSE-FT, the best of the head-phase model, phase 2's end and mixes between.

Phase 2 keeps the epoch with the best val accuracy, or the head phase's model when no epoch
beat it. Neither end is always best: a phase that moved the backbone far often generalises
better partly undone, and one that never beat the probe may still hold something a mix keeps
(``trainer.finetune.weight_interpolation``). So the mixes between phase 2's start
(``phase2-start.pt``, the model the head phase fitted) and its end (``last.pt``) are scored on
val, and the best mix replaces ``best.pt`` only when its val accuracy is higher; ties keep
``best.pt`` (val is small, and a tie is no evidence).

The record (mixes, val accuracies and losses, the one kept and why) goes into ``best.pt``
(``Checkpoint.interpolation``) and the summary. A ``best.pt`` that already records it (a
re-run completing the run's end) is left as it is. Under DDP every rank scores every mix (val
is summed over ranks) and rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch.distributed as dist

from contracts.atomic_files import atomic_write_bytes
from trainer import checkpoint as ckpt
from trainer.finetune.phase_runner import TrainingParts, evaluate_on_val
from trainer.finetune.weight_interpolation import MIXES, interpolate_states
from trainer.job.context import RunContext
from trainer.model.classifier import plain_state_dict, restore_classifier
from trainer.progress import log_event

log = logging.getLogger(__name__)


def interpolate_best(
    context: RunContext, parts: TrainingParts, progress: ckpt.Progress
) -> dict[str, Any] | None:
    """Score the mixes, keep the best in ``best.pt`` (and ``progress``'s best score) when it
    beats it; the record, or None with ``--weight-interpolation off`` (the default) or when
    phase 2 did not run."""
    if context.config.weight_interpolation == "off":
        return None
    if context.dist.enabled:
        dist.barrier()  # rank 0 writes the checkpoints
    best = ckpt.load_checkpoint(context.best_checkpoint)
    if best.interpolation is not None:
        log.info("best.pt records its weight interpolation already; kept as it is")
        return best.interpolation
    start_path, end_path = context.phase_2_start_checkpoint, context.last_checkpoint
    if not start_path.is_file() or not end_path.is_file():
        return None
    end = ckpt.load_checkpoint(end_path)
    if end.position.phase_index != ckpt.PHASE_ORDER["finetune"]:
        return None
    start_state, _ = ckpt.load_checkpoint(start_path).best_state
    end_state, _ = end.best_state
    model, _ = restore_classifier(best)
    model.to(context.device)
    scored = []
    for mix in MIXES:
        model.load_state_dict(plain_state_dict(interpolate_states(start_state, end_state, mix)))
        scored.append((mix, evaluate_on_val(model, parts.pipeline, parts.step, context)))
    mix, result = max(scored, key=lambda item: (item[1].accuracy, -item[1].loss))
    kept = result.accuracy > best.progress.best_val_accuracy
    record: dict[str, Any] = {
        "mixes": [{"mix": m, "val_accuracy": r.accuracy, "val_loss": r.loss} for m, r in scored],
        "best_val_accuracy_before": best.progress.best_val_accuracy,
        "kept_mix": mix if kept else None,
        "reason": (
            f"mix {mix} beats the best epoch on val ({result.accuracy:.4f} > "
            f"{best.progress.best_val_accuracy:.4f})"
            if kept
            else "no mix beats the best epoch on val"
        ),
    }
    if kept:
        best = _with_state(best, interpolate_states(start_state, end_state, mix))
        for kept_progress in (best.progress, progress):
            kept_progress.best_val_accuracy = result.accuracy
            kept_progress.best_confusion = result.confusion.tolist()
    if context.is_main:
        recorded = dataclasses.replace(best, interpolation=record)
        atomic_write_bytes(context.best_checkpoint, ckpt.serialize(recorded))
    log_event(log, "weight_interpolation", kept_mix=record["kept_mix"], reason=record["reason"])
    return record


def _with_state(checkpoint: ckpt.Checkpoint, state: dict[str, Any]) -> ckpt.Checkpoint:
    """``checkpoint`` whose evaluated weights (EMA when kept, else the raw ones) are ``state``."""
    _, key = checkpoint.best_state
    if key == "ema_state":
        return dataclasses.replace(checkpoint, ema_state=state)
    return dataclasses.replace(checkpoint, model_state=state)
