"""Between set-up and the phases: the head stage and phase 2's choice, and the facts they
leave for the summary.

``fit_head_and_choose`` runs the head stage (``trainer.head.stage``: feature cache, converged probe,
augmentation decisions, the head fitted on the cache), writes the decisions into the resolved
config (so ``config.yaml`` and every checkpoint record them) and switches the training
pipeline to the decided augmentation. A resumed run keeps the decisions its checkpoint
recorded (``keep_augment_decisions``) instead of testing again.

With ``--init`` and ``--unfreeze`` left to the data, a probe on a random initialisation's
features is then tested against the source's (``trainer.stages.init_choice``); when it wins,
the run becomes the from-scratch recipe and nothing more is chosen.

Otherwise, from the fitted head, what phase 2 left to the data (``--unfreeze``, ``--lr`` and
``--lr-decay`` auto) is chosen by ``trainer.finetune.choice``; the choice goes into the config
the same way, and the LR range test's curve into ``report/lr_find.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from contracts.atomic_files import atomic_write_bytes
from trainer.augment_defaults import CANDIDATES
from trainer.checkpoint import Checkpoint
from trainer.config import INIT_RANDOM, trains_from_scratch
from trainer.data.augment import augment_settings, train_transform
from trainer.data.augment_policy import decide
from trainer.data.class_balance import ClassBalance
from trainer.evaluation.calibration import Calibration
from trainer.finetune.choice import FinetuneChoice, choose_finetune, untested
from trainer.finetune.phase_runner import TrainingParts
from trainer.finetune.phases import FINETUNE_PHASE, HEAD_PHASE, Phase
from trainer.head.stage import FeatureSettings, HeadStageResult, run_head_stage
from trainer.job.context import RunContext
from trainer.model.classifier import head_module_name
from trainer.stages.init_choice import InitChoice, choose_init

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadAndChoice:
    """The context with the decided config, what the head stage found, phase 2's choice."""

    context: RunContext
    result: HeadStageResult
    finetune: FinetuneChoice
    init: InitChoice | None = None


def fit_head_and_choose(
    context: RunContext, parts: TrainingParts, phases: list[Phase], balance: ClassBalance
) -> HeadAndChoice:
    """Run the head stage; the config gets the augmentation decisions."""
    config, header = context.config, context.header
    trained, pipeline, pre = parts.trained, parts.pipeline, header.preprocessing
    user_flags = {name: getattr(config, name) for name in CANDIDATES}
    probe_aug = augment_settings(config.to_dict())
    fit_the_head = bool(phases) and phases[0].name == HEAD_PHASE
    if not fit_the_head and all(value is not None for value in user_flags.values()):
        # Nothing for the features to do: no head phase, every transform already decided.
        nothing = HeadStageResult(None, decide(user_flags, None, None, {}))
        return HeadAndChoice(context, nothing, untested(config, "no head fitted on features"))
    # Without a head phase the features only decide the augmentation: one view is enough.
    views = config.feature_views if fit_the_head else 1
    settings = FeatureSettings(
        views=views,
        cache_mb=config.feature_cache_mb,
        batch_size=config.batch_size,
        output=context.output,
        fingerprint_parts={
            "arch": config.arch,
            "dataset": header.dataset_fingerprint,
            "preprocessing": pre.to_dict(),
            "augment": dataclasses.asdict(probe_aug),
            "views": views,
            "seed": config.seed,
        },
    )
    result = run_head_stage(
        trained.module,
        head_module_name(trained.module),
        pipeline,
        pre=pre,
        prepare=parts.step.prepare,
        settings=settings,
        info=context.dist,
        fit_the_head=fit_the_head,
        user_flags=user_flags,
        num_classes=header.num_classes,
        class_weights=balance.tensor,
        label_smoothing=config.label_smoothing,
    )
    decided: dict[str, Any] = {name: d.enabled for name, d in result.decisions.items()}
    config = dataclasses.replace(config, **decided)
    final_aug = augment_settings(config.to_dict())
    if final_aug != probe_aug:
        pipeline.train_loader.dataset.transform = train_transform(pre, final_aug)  # type: ignore[attr-defined]
    context = _with_config(context, config)
    init = None
    if result.head_fit is not None and _tests_init(config, phases):
        init = choose_init(context, parts, settings, result.head_fit.val_accuracy, balance.tensor)
        if init.init == INIT_RANDOM:
            return _from_scratch(context, result, init)
        context = _with_config(context, dataclasses.replace(config, init=init.init))
        config = context.config
    finetune = _choose_finetune(context, parts, result, phases)
    context = _with_config(
        context,
        dataclasses.replace(
            config, unfreeze=finetune.unfreeze, lr=finetune.lr, lr_decay=finetune.lr_decay
        ),
    )
    return HeadAndChoice(context, result, finetune, init)


def _tests_init(config: Any, phases: list[Phase]) -> bool:
    """Whether ``--init auto`` is left to test: the source and the policy unset, no guard
    toward the weights asked for, and a phase 2 planned (without one the run is the probe on
    the --weights' features the user asked for)."""
    return (
        not config.init
        and not config.unfreeze
        and config.forgetting_guard in ("auto", "off")
        and any(phase.name == FINETUNE_PHASE for phase in phases)
    )


def _from_scratch(context: RunContext, result: HeadStageResult, init: InitChoice) -> HeadAndChoice:
    """The from-scratch recipe (what ``config.resolve_defaults`` gives ``--init random``); no
    head phase is recorded: the head fitted on the source's features is gone."""
    config = context.config
    config = dataclasses.replace(
        config,
        init=INIT_RANDOM,
        unfreeze="all",
        lr=config.lr if config.lr is not None else config.head_lr,
        lr_decay=config.lr_decay if config.lr_decay is not None else 1.0,
        freeze_bn=False,
    )
    return HeadAndChoice(
        _with_config(context, config),
        dataclasses.replace(result, head_fit=None),
        untested(config, "the from-scratch recipe of --init random", source="--init auto"),
        init,
    )


def _with_config(context: RunContext, config: Any) -> RunContext:
    """The context whose config and checkpoint header record ``config``."""
    return dataclasses.replace(
        context,
        config=config,
        header=dataclasses.replace(context.header, config=config.to_dict()),
    )


def _choose_finetune(
    context: RunContext, parts: TrainingParts, result: HeadStageResult, phases: list[Phase]
) -> FinetuneChoice:
    """Phase 2's policy and LR: tested from the fitted head where they are left to the data."""
    config = context.config
    if not any(phase.name == FINETUNE_PHASE for phase in phases):
        return untested(config, "no phase 2")
    if trains_from_scratch(config) or (config.unfreeze and config.lr is not None):
        return untested(config, "given")
    if result.head_fit is None:
        return untested(config, "the head phase streams: no fitted head to test from")
    choice = choose_finetune(
        context, parts.trained, parts.pipeline, parts.step, result.head_fit.val_accuracy
    )
    if context.is_main and choice.lr_finding is not None:
        path = context.output / "report" / "lr_find.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(choice.lr_finding.to_dict(), indent=1).encode())
    return choice


def keep_augment_decisions(config: Any, resume: Checkpoint) -> Any:
    """The decisions the resumed checkpoint's run made, for candidates still undecided."""
    recorded = resume.header.config or {}
    kept: dict[str, Any] = {
        name: bool(recorded[name])
        for name in CANDIDATES
        if getattr(config, name) is None and recorded.get(name) is not None
    }
    return dataclasses.replace(config, **kept)


def run_facts(
    context: RunContext,
    decided: HeadAndChoice | None,
    balance: ClassBalance,
    calibration: Calibration | None,
) -> dict[str, Any]:
    """The summary's head phase, augmentation, class-balance and calibration entries."""
    config = context.config
    facts: dict[str, Any] = {
        "head_phase_val_accuracy": _head_phase_accuracy(context),
        "augment": {
            "mode": config.augment,
            "crop_scale_min": config.crop_scale_min,
            **{name: getattr(config, name) for name in CANDIDATES},
        },
        "class_balance": {"mode": config.class_balance, **balance.to_dict()},
        "calibration": (
            {"split": "val", **calibration.to_dict()} if calibration is not None else None
        ),
    }
    if decided is not None:
        facts["finetune_choice"] = decided.finetune.to_dict()
        if decided.init is not None:
            facts["init_choice"] = decided.init.to_dict()
        fit, fallback = decided.result.head_fit, decided.result.fallback
        if fit is not None:
            facts["head_phase"] = fit.to_dict()
        elif fallback is not None:
            facts["head_phase"] = {"method": "streamed", "fallback": fallback}
        facts["augment"]["decisions"] = {
            name: d.to_dict() for name, d in decided.result.decisions.items()
        }
    return facts


def _head_phase_accuracy(context: RunContext) -> float | None:
    """The best val accuracy of the head phase's records in ``metrics.jsonl``."""
    path = context.output / "metrics.jsonl"
    if not context.is_main or not path.is_file():
        return None
    scores = [
        float(record["val_accuracy"])
        for line in path.read_text().splitlines()
        if line.strip()
        for record in [json.loads(line)]
        if record.get("phase") == HEAD_PHASE and record.get("val_accuracy") is not None
    ]
    return max(scores) if scores else None
