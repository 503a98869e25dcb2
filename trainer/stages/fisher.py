"""At the end of every run: the best model's diagonal Fisher information, into ``best.pt``.

A later retrain from this checkpoint (``--weights .../best.pt``) holds the weights the old
predictions depend on with EWC (``trainer.finetune.forgetting``). The Fisher is estimated on
the run's training images as the training loader yields them (augmented crops, this rank's
shard), at most ``FISHER_MAX_IMAGES``, with the labels drawn from the model's own predictions. It is
stored as tensors by parameter name, which the safe loader reads without running code, and
doubles ``best.pt``'s size. Rank 0 alone computes it; a ``best.pt`` that has one already (a
re-run completing the run's end) keeps it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from contracts.atomic_files import atomic_write_bytes
from trainer import checkpoint as ckpt
from trainer.data.input_pipeline import Pipeline
from trainer.finetune.forgetting import FisherInformation, estimate_fisher
from trainer.finetune.loop import StepSetup
from trainer.job.context import RunContext
from trainer.model.classifier import restore_classifier
from trainer.progress import log_event

log = logging.getLogger(__name__)

# The sampler epoch the estimate draws its crops from: outside every phase's range.
_FISHER_SAMPLER_EPOCH = 10**9


def store_fisher(context: RunContext, pipeline: Pipeline, step: StepSetup) -> dict[str, Any] | None:
    """Estimate the Fisher of ``best.pt`` and write it there; its counts (None off rank 0)."""
    if not context.is_main:
        return None
    path = context.best_checkpoint
    checkpoint = ckpt.load_checkpoint(path)
    if checkpoint.fisher is not None:
        return FisherInformation.from_dict(checkpoint.fisher, str(path)).facts()
    model, _ = restore_classifier(checkpoint)
    model.to(context.device)
    pipeline.sampler.set_epoch(_FISHER_SAMPLER_EPOCH)
    pipeline.sampler.set_start(0)
    started = time.perf_counter()
    diagonal, images, samples = estimate_fisher(
        model, pipeline.train_loader, prepare=step.prepare, seed=context.config.seed
    )
    fisher = FisherInformation(
        {name: value.cpu() for name, value in diagonal.items()},
        images,
        samples,
        pipeline.train_images,
    )
    recorded = dataclasses.replace(checkpoint, fisher=fisher.to_dict())
    atomic_write_bytes(path, ckpt.serialize(recorded))
    seconds = time.perf_counter() - started
    log_event(log, "fisher_information", **fisher.facts(), seconds=round(seconds, 2))
    return fisher.facts() | {"seconds": round(seconds, 2)}
