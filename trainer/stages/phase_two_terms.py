"""Phase 2's extra loss terms of a run, built once the head phase is done.

- The feature alignment toward the unlabelled images (``--unlabeled-data``,
  ``trainer.finetune.feature_alignment``), when given and ``--alignment-weight`` is above 0.
- The forgetting guard toward the starting weights (``--forgetting-guard``,
  ``trainer.finetune.forgetting``): the source file is read again here (a resumed run rebuilds the
  guard from ``--weights`` the same way), its stored Fisher information decides ``auto``.

Both are ``StepPenalty``s the phase runner adds to phase 2's steps. The mean prediction
entropy on the unlabelled images is measured here too, on the model phase 2 starts from.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from trainer.config import INIT_RANDOM, TrainConfig
from trainer.data.augment import augment_settings, train_transform
from trainer.data.unlabeled import UnlabeledImages, UnlabeledStream
from trainer.finetune.feature_alignment import FeatureAlignment
from trainer.finetune.forgetting import (
    L2SP,
    OFF,
    FisherInformation,
    ForgettingGuard,
    GuardChoice,
    choose_guard,
    guard_weight,
)
from trainer.finetune.phase_runner import TrainedModel, TrainingParts
from trainer.finetune.step_penalty import StepPenalty, combine
from trainer.job.context import RunContext
from trainer.model.weights import names_a_file, resolve_weights
from trainer.progress import log_event
from trainer.stages.adaptation import mean_prediction_entropy, unlabeled_eval_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhaseTwoTerms:
    """The penalty phase 2 adds (None: none), its parts, and the entropy before phase 2."""

    penalty: StepPenalty | None
    alignment: FeatureAlignment | None
    guard: ForgettingGuard | None
    guard_choice: GuardChoice
    entropy_before: float | None

    def alignment_facts(self) -> dict[str, Any] | None:
        """What the alignment term was (None without one), for the summary and checkpoint."""
        if self.alignment is None:
            return None
        return self.alignment.facts() | {"last_epoch": self.alignment.last_epoch}

    def summary(self) -> dict[str, Any]:
        """The summary's ``forgetting_guard`` entry."""
        if self.guard is not None:
            return {"forgetting_guard": self.guard.facts()}
        return {"forgetting_guard": {"method": OFF, "reason": self.guard_choice.reason}}


def phase_two_terms(
    context: RunContext, parts: TrainingParts, unlabeled: UnlabeledImages | None, *, fresh: bool
) -> PhaseTwoTerms:
    """Build phase 2's terms; ``fresh``: the run starts phase 2 now (not resumed), so the
    entropy before phase 2 is measured.

    Raises:
        ConfigError: a ``--forgetting-guard`` that the source weights cannot serve.
        WeightsUnavailable: the source file is gone (a resumed run).
    """
    config, trained, step = context.config, parts.trained, parts.step
    pre = context.header.preprocessing
    if config.finetune_epochs == 0:
        return PhaseTwoTerms(None, None, None, GuardChoice(OFF, "no phase 2"), None)
    guard, choice = _forgetting_guard(config, trained, parts.pipeline.train_images)
    alignment = None
    if unlabeled is not None and config.alignment_weight > 0:
        # The unlabelled images are the polarity the labelled ones are inverted toward.
        aug = dataclasses.replace(augment_settings(config.to_dict()), invert=0.0)
        transform = train_transform(pre, aug)
        alignment = FeatureAlignment(
            trained.module,
            UnlabeledStream(unlabeled.images, transform, config.batch_size, config.seed),
            step,
            max_weight=config.alignment_weight,
        )
    entropy_before = None
    if unlabeled is not None and fresh:
        batches = unlabeled_eval_batches(unlabeled, pre, config.batch_size)
        entropy_before = mean_prediction_entropy(trained.evaluated, batches, step)
        log_event(log, "unlabeled_entropy", stage="before_phase_2", mean_entropy=entropy_before)
    terms: list[StepPenalty] = [p for p in (alignment, guard) if p is not None]
    return PhaseTwoTerms(combine(terms), alignment, guard, choice, entropy_before)


def _forgetting_guard(
    config: TrainConfig, trained: TrainedModel, train_images: int
) -> tuple[ForgettingGuard | None, GuardChoice]:
    mode, spec = config.forgetting_guard, config.weights
    if config.init == INIT_RANDOM:  # config.validate refuses ewc and l2sp with it
        choice = GuardChoice(OFF, "--init random: phase 2 does not start from the --weights")
        log_event(log, "forgetting_guard", method=choice.method, reason=choice.reason)
        return None, choice
    is_file = names_a_file(spec)
    # Torchvision weights are read again only when asked for by name (l2sp).
    needs_source = mode != OFF and spec.strip().lower() != "none" and (is_file or mode == L2SP)
    source = resolve_weights(config.arch, spec) if needs_source else None
    fisher = (
        FisherInformation.from_dict(source.fisher, spec)
        if source is not None and source.fisher is not None
        else None
    )
    choice = choose_guard(mode, spec, is_file=is_file, has_fisher=fisher is not None)
    if choice.method != OFF and config.forgetting_weight == 0:
        choice = GuardChoice(OFF, "forgetting_weight is 0")
    log_event(log, "forgetting_guard", method=choice.method, reason=choice.reason)
    if choice.method == OFF or source is None or source.state_dict is None:
        return None, choice
    guard = ForgettingGuard(
        trained.module,
        choice,
        source.state_dict,
        fisher,
        weight=guard_weight(choice, config.forgetting_weight, fisher, train_images),
        source=spec,
    )
    return guard, choice
