"""After training with ``--unlabeled-data``: AdaBN as a candidate, and the record of it all.

The best model is evaluated on the labelled val split twice: as trained, and with every
BatchNorm layer's running statistics re-estimated on the unlabelled images (AdaBN,
``domain_adaptation.adapt_batchnorm``). The AdaBN statistics are kept only when the val
accuracy does not drop; both accuracies are recorded either way. The val split is of the
labelled (source) domain, so this is a guard against harm, not a measure of the gain on the
target: that needs labelled target images (``trainer evaluate`` on a test folder).

The mean prediction entropy on the unlabelled images, a signal that needs no labels, is
recorded for the model at the start of phase 2 (``before_phase_2``; None for a resumed run,
which did not see that model), for the best model as trained and with AdaBN.

The record (counts, methods, weights, the decision; never the images or their names) goes
into ``best.pt`` (``Checkpoint.adaptation``), and from there into ``model.json``; the
summary has it too. Under DDP every rank computes the same statistics (each holds every
unlabelled image) and the same decision (val is summed over ranks); rank 0 writes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from contracts.atomic_files import atomic_write_bytes
from contracts.preprocessing import Preprocessing
from trainer import checkpoint as ckpt
from trainer.data.augment import eval_transform
from trainer.data.unlabeled import UnlabeledImages
from trainer.finetune.domain_adaptation import adapt_batchnorm, batchnorm_layers, prediction_entropy
from trainer.finetune.loop import StepSetup, autocast
from trainer.finetune.phase_runner import TrainingParts, evaluate_on_val
from trainer.job.context import RunContext
from trainer.model.classifier import plain_state_dict, restore_classifier
from trainer.progress import log_event

log = logging.getLogger(__name__)

_BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@torch.inference_mode()
def mean_prediction_entropy(
    model: nn.Module, batches: list[torch.Tensor], step: StepSetup
) -> float:
    """The mean entropy (nats) of ``model``'s predicted distribution over ``batches``."""
    model.eval()
    total = torch.zeros((), device=step.device, dtype=torch.float64)
    count = 0
    for batch in batches:
        with autocast(step.device, step.amp_dtype):
            logits = model(step.prepare(batch))
        total += prediction_entropy(logits).double().sum()
        count += len(batch)
    return float(total) / count if count else float("nan")


def unlabeled_eval_batches(
    unlabeled: UnlabeledImages, pre: Preprocessing, batch_size: int
) -> list[torch.Tensor]:
    """The unlabelled images through the eval crop, as the deployed model sees them."""
    return unlabeled.eval_crops(eval_transform(pre), batch_size)


def adapt_best(  # noqa: PLR0913  the run's parts, and what set-up and phase 2 recorded
    context: RunContext,
    parts: TrainingParts,
    unlabeled: UnlabeledImages,
    *,
    alignment: dict[str, Any] | None,
    inversion: dict[str, Any],
    entropy_before: float | None,
) -> dict[str, Any]:
    """Try AdaBN on ``best.pt``, keep it when val accuracy does not drop, record it all.

    A ``best.pt`` that already records its adaptation (a re-run completing the run's end) is
    left as it is and its record returned.
    """
    if context.dist.enabled:
        dist.barrier()  # best.pt is written by rank 0
    checkpoint = ckpt.load_checkpoint(context.best_checkpoint)
    if checkpoint.adaptation is not None:
        log.info("best.pt records its adaptation already; kept as it is")
        return checkpoint.adaptation
    model, _ = restore_classifier(checkpoint)
    model.to(context.device)
    pipeline, step = parts.pipeline, parts.step
    pre = context.header.preprocessing
    batches = unlabeled_eval_batches(unlabeled, pre, context.config.batch_size)
    as_trained = evaluate_on_val(model, pipeline, step, context)
    entropy_as_trained = mean_prediction_entropy(model, batches, step)
    adapted = copy.deepcopy(model)
    images = adapt_batchnorm(adapted, batches, step.prepare)
    with_adabn = evaluate_on_val(adapted, pipeline, step, context) if images else None
    entropy_adabn = mean_prediction_entropy(adapted, batches, step) if images else None
    kept = with_adabn is not None and with_adabn.accuracy >= as_trained.accuracy
    if not batchnorm_layers(model):
        reason = "the model has no BatchNorm layer"
    elif kept:
        reason = "val accuracy did not drop"
    else:
        reason = "val accuracy dropped"
    record: dict[str, Any] = {
        "unlabeled_data": unlabeled.facts(),
        "feature_alignment": alignment,
        "polarity_inversion": inversion,
        "adabn": {
            "kept": kept,
            "reason": reason,
            "images": images,
            "val_accuracy_as_trained": as_trained.accuracy,
            "val_accuracy_with_adabn": with_adabn.accuracy if with_adabn is not None else None,
        },
        "prediction_entropy": {
            "before_phase_2": entropy_before,
            "as_trained": entropy_as_trained,
            "with_adabn": entropy_adabn,
        },
    }
    if context.is_main:
        recorded = dataclasses.replace(checkpoint, adaptation=record)
        if kept:
            recorded = _with_batchnorm_statistics(recorded, adapted)
        atomic_write_bytes(context.best_checkpoint, ckpt.serialize(recorded))
    log_event(
        log,
        "adaptation",
        adabn_kept=kept,
        adabn_reason=reason,
        val_accuracy_as_trained=as_trained.accuracy,
        val_accuracy_with_adabn=record["adabn"]["val_accuracy_with_adabn"],
        entropy_before_phase_2=entropy_before,
        entropy_as_trained=entropy_as_trained,
        entropy_with_adabn=entropy_adabn,
        unlabeled_images=len(unlabeled.images),
    )
    return record


def _with_batchnorm_statistics(checkpoint: ckpt.Checkpoint, adapted: nn.Module) -> ckpt.Checkpoint:
    """The checkpoint whose evaluated weights (EMA or raw) carry ``adapted``'s BatchNorm
    buffers; every other tensor stays as it was."""
    layers = {id(layer) for layer in batchnorm_layers(adapted)}
    statistics = {
        f"{name}.{buffer}": getattr(module, buffer).detach().cpu().clone()
        for name, module in adapted.named_modules()
        if id(module) in layers
        for buffer in _BATCHNORM_BUFFERS
    }
    state, key = checkpoint.best_state
    # Stored keys may carry EMA or DDP prefixes: plain name -> stored key.
    stored_key = plain_state_dict({stored: stored for stored in state})
    updated = dict(state)
    for plain, stored in stored_key.items():
        if plain in statistics:
            updated[stored] = statistics[plain]
    if key == "ema_state":
        return dataclasses.replace(checkpoint, ema_state=updated)
    return dataclasses.replace(checkpoint, model_state=updated)
