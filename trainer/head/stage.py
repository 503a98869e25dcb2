"""Before the phases: the feature cache, the converged head and the augmentation decisions.

``run_head_stage`` computes (or reuses) the frozen backbone's features of the run's images,
fits a linear probe on them, decides the label-changing transforms with it
(``augment_policy``), and fits the head on the cache when the head phase would only train the
head. The phase runner then records the head phase as done and phase 2 starts from that head.

It falls back, logged, to the streaming head phase when the training features exceed
``feature_cache_mb`` at one view per image, or when the head has BatchNorm inside.

Under DDP every rank computes the features of its shard of the images; the shards are
all-gathered, rank 0 writes the cache, fits the probe and the head and decides, and broadcasts
the head's parameters and the decisions, so every rank starts phase 2 from the same head.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from contracts.preprocessing import Preprocessing
from trainer.data.augment import eval_transform
from trainer.data.augment_policy import AugmentDecision, decide
from trainer.data.input_pipeline import Pipeline
from trainer.head import feature_cache as fc
from trainer.head.fit import HeadFit, fit_head, fit_probe, head_kind, probe_predictor
from trainer.job.process_setup import DistInfo
from trainer.progress import log_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSettings:
    """What the features depend on and how many there may be."""

    views: int
    cache_mb: int
    batch_size: int
    output: Path
    fingerprint_parts: dict[str, Any]
    cache_name: str = fc.CACHE_FILE.name


@dataclass(frozen=True)
class HeadStageResult:
    """The fitted head (None: the head phase streams), the decisions, and why it streams."""

    head_fit: HeadFit | None
    decisions: dict[str, AugmentDecision]
    fallback: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_head_stage(  # noqa: PLR0913  the parts of the run the stage reads, each built by trainer.run
    model: nn.Module,
    head_name: str,
    pipeline: Pipeline,
    *,
    pre: Preprocessing,
    prepare: Any,
    settings: FeatureSettings,
    info: DistInfo,
    fit_the_head: bool,
    user_flags: dict[str, bool | None],
    num_classes: int,
    class_weights: torch.Tensor | None,
    label_smoothing: float = 0.0,
) -> HeadStageResult:
    """Features, probe, decisions and (when ``fit_the_head``) the head fitted on the cache."""
    started = time.perf_counter()
    head = model.get_submodule(head_name)
    streamed = None
    if fit_the_head and head_kind(head) is None:
        streamed = "the head has layers other than Linear/activation/Dropout/LayerNorm"
        log_event(log, "head_fit_fallback", reason=streamed + ": streaming head phase")
        fit_the_head = False
    extract = fc.FeatureExtractor(model, head, prepare)
    bank, cache_state = _features(extract, pipeline, pre, settings, info)
    if cache_state == "none":
        reason = f"features exceed feature_cache_mb={settings.cache_mb}"
        outcome = ": streaming head phase" if fit_the_head else ": augmentation untested"
        log_event(log, "head_fit_fallback", reason=reason + outcome)
        fallback = reason if fit_the_head else None
        return HeadStageResult(None, decide(user_flags, None, None, {}), fallback=fallback)
    result: list[Any] = [None, None, None]
    if info.is_main:
        assert bank is not None
        probe = fit_probe(bank.train, bank.val, num_classes, class_weights)
        log_event(
            log,
            "linear_probe",
            val_accuracy=round(probe.val_accuracy, 4),
            train_accuracy=round(probe.train_accuracy, 4),
            l2=probe.l2,
            rows=len(bank.train.labels),
            views=bank.views,
        )
        decisions = decide(
            user_flags,
            probe_predictor(probe),
            (bank.val.features, bank.val.labels),
            bank.val_transformed,
        )
        fitted = None
        if fit_the_head:
            fitted = fit_head(
                head,
                probe,
                bank.train,
                bank.val,
                num_classes=num_classes,
                class_weights=class_weights,
                views=bank.views,
                cache=cache_state,
                started=started,
                label_smoothing=label_smoothing,
            )
        result = [fitted, decisions, {k: v.cpu() for k, v in head.state_dict().items()}]
    if info.enabled:
        dist.broadcast_object_list(result, src=0)
        head.load_state_dict(result[2])
    return HeadStageResult(result[0], result[1], fallback=streamed)


def probe_accuracy(  # noqa: PLR0913  the same parts as run_head_stage
    model: nn.Module,
    head_name: str,
    pipeline: Pipeline,
    *,
    pre: Preprocessing,
    prepare: Any,
    settings: FeatureSettings,
    info: DistInfo,
    num_classes: int,
    class_weights: torch.Tensor | None,
) -> float | None:
    """The val accuracy of a linear probe on ``model``'s frozen features (None: the features
    exceed the cache budget); the same on every rank."""
    extract = fc.FeatureExtractor(model, model.get_submodule(head_name), prepare)
    bank, cache_state = _features(extract, pipeline, pre, settings, info)
    accuracy: list[float | None] = [None]
    if info.is_main and cache_state != "none":
        assert bank is not None
        accuracy[0] = fit_probe(bank.train, bank.val, num_classes, class_weights).val_accuracy
    if info.enabled:
        dist.broadcast_object_list(accuracy, src=0)
    return accuracy[0]


def _features(
    extract: fc.FeatureExtractor,
    pipeline: Pipeline,
    pre: Preprocessing,
    settings: FeatureSettings,
    info: DistInfo,
) -> tuple[fc.FeatureBank | None, str]:
    """The bank (reused when rank 0 holds a valid one, else computed), and which it was."""
    model, head = extract.model, extract.head
    path = settings.output / fc.CACHE_FILE.parent / settings.cache_name
    head_prefix = next(n for n, m in model.named_modules() if m is head)
    key = fc.fingerprint(
        settings.fingerprint_parts | {"weights": fc.weights_digest(model, head_prefix)}
    )
    loaded = fc.load_bank(path, key) if info.is_main else None
    found = [loaded is not None]
    if info.enabled:
        dist.broadcast_object_list(found, src=0)
    if found[0] and loaded is None:
        return None, "reused"  # on the other ranks: rank 0 holds the bank
    if loaded is not None:
        log.info("feature cache %s reused (%d train rows)", path, len(loaded.train.labels))
        return loaded, "reused"
    val, val_transformed = fc.val_features(extract, pipeline.eval_batches())
    dim = val.features[0].numel() if len(val.features) else 0
    views = _views_within_budget(pipeline, settings, dim)
    if views == 0:
        return None, "none"
    dataset = pipeline.train_loader.dataset
    train = fc.train_view_features(
        extract,
        dataset,
        indices=list(range(info.rank, pipeline.train_images, info.world_size)),
        views=views,
        eval_dataset=fc.with_transform(dataset, eval_transform(pre)),
        batch_size=settings.batch_size * 2,
    )
    bank = fc.gather_bank(fc.FeatureBank(train, val, val_transformed, views))
    if info.is_main:
        fc.save_bank(path, bank, key)
        log.info("feature cache %s written (%.1f MiB)", path, bank.nbytes / 2**20)
    return bank, "built"


def _views_within_budget(pipeline: Pipeline, settings: FeatureSettings, dim: int) -> int:
    """``settings.views``, fewer when they exceed the budget, 0 when even one does."""
    budget = settings.cache_mb * 2**20
    for views in range(settings.views, 0, -1):
        size = fc.estimated_bytes(pipeline.train_images, pipeline.val_images, views, dim)
        if size <= budget:
            if views < settings.views:
                log.info(
                    "feature cache: %d views per image fit feature_cache_mb=%d (not %d)",
                    views,
                    settings.cache_mb,
                    settings.views,
                )
            return views
    return 0
