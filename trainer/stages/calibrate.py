"""After training: fit the softmax temperature of the best model on the val split.

Which split: val, the only held-out data a run has. Val also chose the best epoch and early
stopping, so it is not untouched; but those read the arg-max (accuracy), which a temperature
does not change, and one scalar fitted on a few hundred images barely overfits (Guo et al.
fit T on the same validation set they select models on). A separate calibration split would
take images from training or from model selection, which costs more on the small datasets
this trainer is for. The fitted T, and ECE (15 bins) and NLL before and after, are written into
``best.pt`` (``Checkpoint.calibration``), so every export of it, by the run or by
``trainer export``, divides the logits by T.

Under DDP every rank computes the logits of its share of val; rank 0 gathers them, fits T and
rewrites ``best.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import torch
import torch.distributed as dist

from contracts.atomic_files import atomic_write_bytes
from trainer import checkpoint as ckpt
from trainer.data.input_pipeline import Pipeline
from trainer.evaluation.calibration import Calibration, fit_temperature
from trainer.finetune.loop import StepSetup, autocast
from trainer.head.linear_probe import single_threaded
from trainer.job.context import RunContext
from trainer.model.classifier import restore_classifier
from trainer.progress import log_event

log = logging.getLogger(__name__)


def calibrate_best(context: RunContext, pipeline: Pipeline, step: StepSetup) -> Calibration | None:
    """Fit T for ``best.pt`` and record it there; None with ``--calibrate off``."""
    if context.config.calibrate == "off":
        return None
    if context.dist.enabled:
        dist.barrier()  # best.pt is written by rank 0
    checkpoint = ckpt.load_checkpoint(context.best_checkpoint)
    model, _ = restore_classifier(checkpoint)
    model.to(context.device)
    logits, labels = _val_logits(model, pipeline, step, context.device)
    if context.dist.enabled:
        shards: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(shards, (logits, labels))
        logits = torch.cat([s[0] for s in shards if s is not None])
        labels = torch.cat([s[1] for s in shards if s is not None])
    if not context.is_main or len(labels) == 0:
        return None
    with single_threaded():
        calibration = fit_temperature(logits, labels)
    recorded = dataclasses.replace(checkpoint, calibration=calibration.record())
    atomic_write_bytes(context.best_checkpoint, ckpt.serialize(recorded))
    document = {"split": "val", **calibration.to_dict()}
    atomic_write_bytes(
        context.output / "report" / "calibration.json", json.dumps(document, indent=2).encode()
    )
    log_event(log, "calibrated", **document)
    return calibration


@torch.no_grad()
def _val_logits(
    model: torch.nn.Module, pipeline: Pipeline, step: StepSetup, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    outputs, targets = [], []
    for images, labels in pipeline.eval_batches():
        if len(labels) == 0:
            continue
        with autocast(device, step.amp_dtype):
            outputs.append(model(step.prepare(images)).float().cpu())
        targets.append(labels.long())
    if not outputs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outputs), torch.cat(targets)
