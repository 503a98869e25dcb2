"""A training run, top to bottom: set up, run the phases, then report, export and summarise.

The one place the trainer is composed. ``train`` sets up the process, resolves the config's
defaults, builds the frozen ``RunContext`` and every part the phases need, runs them with
``PhaseRunner``, and owns the end-of-run effects (report, export, ``summary.json``). Nothing
below this module imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from contracts.preprocessing import Preprocessing
from trainer import checkpoint as ckpt
from trainer.checkpoint import Checkpoint, CheckpointHeader, HeadSpec, Progress
from trainer.config import (
    INIT_RANDOM,
    TrainConfig,
    resolve_defaults,
    save_config,
    trains_from_scratch,
)
from trainer.data.augment import BatchPreparer, augment_settings, batch_mixer
from trainer.data.class_balance import ClassBalance, class_balance
from trainer.data.folders import DatasetSplit, scan_dataset
from trainer.data.input_pipeline import LoaderSettings, build_pipeline, dataset_fits_cache
from trainer.data.polarity import InversionChoice, choose_inversion, labelled_sample
from trainer.data.unlabeled import UnlabeledImages, load_unlabeled_images
from trainer.errors import CheckpointError, ConfigError
from trainer.evaluation.chance import warn_if_near_chance
from trainer.evaluation.strategies import write_strategies
from trainer.finetune.choice import FALLBACK_LR_DECAY, FALLBACK_POLICY
from trainer.finetune.loop import StepSetup
from trainer.finetune.lr_finder import FALLBACK_LR
from trainer.finetune.phase_runner import (
    INTERRUPTED,
    PhaseRunner,
    RunObservers,
    TrainedModel,
    TrainingParts,
)
from trainer.finetune.phases import Phase, build_phases
from trainer.job.context import RunContext
from trainer.job.metrics_log import MetricsLog, write_summary
from trainer.job.process_setup import (
    DistInfo,
    configure_threads,
    dist_info_from_env,
    init_distributed,
    seed_everything,
    select_amp,
    select_device,
    shutdown_distributed,
)
from trainer.job.stopping import RunStopped, StopRequest
from trainer.job.telemetry import TrainingTelemetry
from trainer.job.trainjob_progress import trainjob_progress_from_env
from trainer.model.classifier import create_model
from trainer.model.layer_groups import LayerGroup, family, layer_groups
from trainer.model.weights import load_starting_weights, preprocessing_for, resolve_weights
from trainer.progress import log_event
from trainer.stages.adaptation import adapt_best
from trainer.stages.calibrate import calibrate_best
from trainer.stages.fisher import store_fisher
from trainer.stages.head_and_choice import fit_head_and_choose, keep_augment_decisions, run_facts
from trainer.stages.init_choice import random_initialisation
from trainer.stages.interpolation import interpolate_best
from trainer.stages.phase_two_terms import PhaseTwoTerms, phase_two_terms
from trainer.stages.resume import settings_for_resume, training_is_finished

log = logging.getLogger(__name__)

ALREADY_FINISHED = "already_finished"


def train(config: TrainConfig, given: Collection[str] | None = None) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the summary (rank 0 writes it).

    Args:
        config: defaults < file < environment < flags.
        given: the names of the settings the user gave (None: every one). A resumed run
            takes the others from its checkpoint, never from the defaults.
    """
    info = dist_info_from_env()
    if not info.is_main:
        # Rank 0 alone logs progress; the others speak up only for warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    device = select_device(config.device, info)
    configure_threads()
    init_distributed(info, device)
    # Installed before the data scan: a preemption can land in any stage of the run.
    stop = StopRequest(config.stop_timeout, distributed=info.enabled, device=device)
    stop.install()
    try:
        return _train(config, given, info, device, stop)
    except RunStopped as stopped:
        return _stopped_between_steps(stopped.stage, Path(config.output or "."))
    finally:
        stop.uninstall()
        shutdown_distributed()


def _stopped_between_steps(stage: str, output: Path) -> dict[str, Any]:
    """A stop outside the phases: what the last checkpoint (if any) lets ``--resume`` skip."""
    last = output / "checkpoints" / ckpt.LAST
    saved = str(last) if last.is_file() else None
    log_event(log, "stopped", reason="signal", stage=stage, checkpoint=saved)
    log.info(
        "stopped during %s; %s",
        stage,
        "--resume auto continues from the last checkpoint and redoes that stage"
        if saved
        else "no checkpoint yet: --resume auto starts the run again",
    )
    return {"status": INTERRUPTED, "stage": stage, "checkpoint": saved}


def _train(
    config: TrainConfig,
    given: Collection[str] | None,
    info: DistInfo,
    device: torch.device,
    stop: StopRequest,
) -> dict[str, Any]:
    started = time.perf_counter()
    # ---- set up: data, model (new or resumed), resolved config, context ----------------------
    stop.enter_stage("the data scan and set-up")
    setup = set_up(config, given, info, device)
    context, resume, phases = setup.context, setup.resume, setup.phases
    if resume is not None and training_is_finished(resume, phases):
        asked = _export_asked(context.config, given)
        finished = already_finished(context, resume, export_asked=asked)
        if finished is not None:
            return finished
    parts, balance = build_training_parts(setup)
    decided = None
    if resume is None:
        stop.enter_stage("the head phase and phase 2's choice")
        decided = fit_head_and_choose(context, parts, phases, balance)
        # The plan again, with phase 2's policy and LR as the stage chose them.
        context = decided.context
        phases = plan_phases(context.config, [g.name for g in parts.trained.groups])
    terms = phase_two_terms(context, parts, setup.unlabeled, fresh=resume is None)
    parts = dataclasses.replace(parts, step=dataclasses.replace(parts.step, penalty=terms.penalty))
    record_run_start(context, parts)
    # ---- the phases ------------------------------------------------------------------------
    metrics = _open_metrics_log(context, resume)
    stop.enter_stage(None)  # the phases finish their step and save a checkpoint
    with run_observers(context, metrics, stop, phases) as observers:
        runner = PhaseRunner(context, parts, observers)
        if decided is not None and decided.result.head_fit is not None:
            runner.record_fitted_head(phases[0], decided.result.head_fit)
            phases = phases[1:]
        outcome = runner.run_phases(phases, resume)
    if outcome.status == INTERRUPTED:
        log_event(log, "stopped", reason="signal", checkpoint=str(context.last_checkpoint))
        return {"status": INTERRUPTED, "checkpoint": str(context.last_checkpoint)}
    # ---- report, export, summary -----------------------------------------------------------
    # Until summary.json is written a re-run with --resume auto completes the run's end.
    stop.enter_stage("the weight interpolation")
    interpolation = interpolate_best(context, parts, outcome.progress)
    adapted = adapt_and_store_fisher(context, parts, setup, terms, stop)
    stop.enter_stage("calibration")
    calibration = calibrate_best(context, parts.pipeline, parts.step)
    extra = run_facts(context, decided, balance, calibration) | terms.summary() | adapted
    extra["augment"]["invert"] = setup.inversion.to_dict()
    extra["weight_interpolation"] = interpolation
    stop.enter_stage("the report and export")
    return finish_run(context, outcome.progress, time.perf_counter() - started, extra)


@contextlib.contextmanager
def run_observers(
    context: RunContext, metrics: MetricsLog | None, stop: StopRequest, phases: list[Phase]
) -> Iterator[RunObservers]:
    """What the phases report to, closed when they end: the metrics log, the Prometheus gauges
    (``--metrics-port``) and, on rank 0 inside a Kubeflow TrainJob, the TrainJob's status."""
    telemetry = TrainingTelemetry(context.config.metrics_port if context.is_main else None)
    plan = [(phase.name, phase.epochs) for phase in phases]
    trainjob = trainjob_progress_from_env(os.environ, plan) if context.is_main else None
    try:
        yield RunObservers(metrics, telemetry, stop, trainjob)
    finally:
        telemetry.close()
        if trainjob is not None:
            trainjob.close()


def adapt_and_store_fisher(
    context: RunContext,
    parts: TrainingParts,
    setup: RunSetup,
    terms: PhaseTwoTerms,
    stop: StopRequest,
) -> dict[str, Any]:
    """AdaBN as a candidate for ``best.pt`` (with ``--unlabeled-data``), then the Fisher
    information of ``best.pt`` for a later retrain's EWC; the summary's entries of both."""
    adaptation = None
    if setup.unlabeled is not None:
        stop.enter_stage("domain adaptation")
        adaptation = adapt_best(
            context,
            parts,
            setup.unlabeled,
            alignment=terms.alignment_facts(),
            inversion=setup.inversion.to_dict(),
            entropy_before=terms.entropy_before,
        )
    stop.enter_stage("the Fisher information")
    fisher = store_fisher(context, parts.pipeline, parts.step)
    return {"adaptation": adaptation, "fisher_information": fisher}


# ---- set-up steps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSetup:
    """What the set-up resolves before any image is decoded.

    Attributes:
        context: the resolved config, the process's place in the job, the checkpoint header.
        resume: the checkpoint the run continues from, if any.
        split: the scanned data and its train/val split.
        model: the network with its starting (or resumed) weights, still on the CPU.
        groups: its layer groups, stem to head.
        phases: the phases the resolved config plans.
        unlabeled: the ``--unlabeled-data`` images, if given.
        inversion: how often a labelled training image is inverted, and why.
    """

    context: RunContext
    resume: Checkpoint | None
    split: DatasetSplit
    model: nn.Module
    groups: list[LayerGroup]
    phases: list[Phase]
    unlabeled: UnlabeledImages | None
    inversion: InversionChoice


def set_up(
    config: TrainConfig, given: Collection[str] | None, info: DistInfo, device: torch.device
) -> RunSetup:
    """Resume or start: the settings and the data, the model and its preprocessing, the
    defaults that depend on them resolved (``config.resolve_defaults``), the phases."""
    assert config.output is not None
    output = Path(config.output)
    config, resume, split = settings_and_data(config, given, output / "checkpoints")
    model, pre, weights_source = build_model(config, len(split.classes), resume)
    unlabeled = (
        load_unlabeled_images(config.unlabeled_data, shorter_side=pre.resize_size, seed=config.seed)
        if config.unlabeled_data is not None
        else None
    )
    config = resolve_defaults(
        config,
        device_type=device.type,
        dataset_cached=dataset_fits_cache(split, pre, config.cache_max_mb),
        cpu_count=os.cpu_count() or 1,
        input_size=pre.input_size[0],
    )
    if resume is not None:
        config = keep_augment_decisions(config, resume)
    inversion = _inversion(config, split, unlabeled, pre.resize_size)
    config = dataclasses.replace(config, invert=inversion.probability)
    context = RunContext(
        config=config,
        dist=info,
        device=device,
        output=output,
        checkpoints=output / "checkpoints",
        header=_header(config, split, pre, weights_source),
    )
    groups = layer_groups(model, config.arch)
    phases = plan_phases(config, [g.name for g in groups])
    return RunSetup(context, resume, split, model, groups, phases, unlabeled, inversion)


def _inversion(
    config: TrainConfig, split: DatasetSplit, unlabeled: UnlabeledImages | None, shorter_side: int
) -> InversionChoice:
    """``--invert`` as given (or recorded by the run resumed), else from the polarity of the
    labelled and unlabelled images (``trainer.data.polarity``)."""
    if config.invert is not None:
        return InversionChoice(config.invert, "setting")
    if unlabeled is None:
        return InversionChoice(0.0, "no unlabelled images")
    labelled = labelled_sample(
        split.train, shorter_side=shorter_side, seed=config.seed, threads=os.cpu_count() or 1
    )
    choice = choose_inversion(labelled, unlabeled.images)
    log_event(log, "invert_decision", **choice.to_dict())
    return choice


def build_training_parts(setup: RunSetup) -> tuple[TrainingParts, ClassBalance]:
    """The input pipeline (the images decoded or streamed), the model on its device with its
    EMA copy, how a step computes; and the class balance the loss weights come from."""
    context = setup.context
    config, device = context.config, context.device
    pre, num_classes = context.header.preprocessing, context.header.num_classes
    aug = augment_settings(config.to_dict())
    loading = LoaderSettings(
        batch_size=config.batch_size,
        seed=config.seed,
        strict=config.strict_data,
        cache_max_mb=config.cache_max_mb,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    pipeline = build_pipeline(setup.split, pre=pre, aug=aug, loading=loading, info=context.dist)
    amp_dtype, needs_scaler = select_amp(config.amp, device)
    balance = class_balance(pipeline.train_labels, num_classes, config.class_balance)
    trained = _place_model(setup.model, setup.groups, context)
    step = StepSetup(
        device=device,
        prepare=BatchPreparer(pre, device, bool(config.channels_last)),
        mixer=batch_mixer(aug, num_classes),
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler("cuda") if needs_scaler else None,
        loss_fn=nn.CrossEntropyLoss(weight=balance.tensor, label_smoothing=config.label_smoothing),
    )
    return TrainingParts(trained, pipeline, step), balance


def record_run_start(context: RunContext, parts: TrainingParts) -> None:
    """``config.yaml`` as the run resolved it (rank 0), and the ``run_start`` event."""
    config, header, pipeline = context.config, context.header, parts.pipeline
    if context.is_main:
        context.checkpoints.mkdir(parents=True, exist_ok=True)
        save_config(config, context.output / "config.yaml")
    amp_dtype = parts.step.amp_dtype
    log_event(
        log,
        "run_start",
        arch=config.arch,
        weights=header.weights,
        classes=header.num_classes,
        train_images=pipeline.train_images,
        val_images=pipeline.val_images,
        cached=pipeline.cached,
        device=str(context.device),
        amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        channels_last=config.channels_last,
        world_size=context.dist.world_size,
        input_size=header.preprocessing.input_size[0],
    )


def settings_and_data(
    config: TrainConfig, given: Collection[str] | None, checkpoints: Path
) -> tuple[TrainConfig, Checkpoint | None, DatasetSplit]:
    """The checkpoint to resume (if any), the config the run continues with, the data split.

    A resumed run's settings are its checkpoint's, overlaid with the ``given`` ones; the
    seed and the split follow from them.

    Raises:
        ConfigError: a given setting (or the data's classes) would change what the resumed
            checkpoint means; one message names them all.
    """
    resume = find_resume(config.resume, checkpoints)
    resumed = settings_for_resume(config, given, resume) if resume is not None else None
    if resumed is not None:
        config = resumed.config
    seed_everything(config.seed, config.deterministic)
    assert config.data is not None
    split = scan_dataset(
        config.data, val_fraction=config.val_fraction, seed=config.seed, strict=config.strict_data
    )
    if resumed is not None:
        resumed.check(split, config.data)
    return config, resume, split


def find_resume(mode: str, checkpoints: Path) -> Checkpoint | None:
    """The checkpoint to continue from: ``auto`` (newest valid in OUTPUT), ``never``, a PATH.

    Raises:
        CheckpointError: the PATH (or a checkpoint in OUTPUT) is unsafe, or the PATH is not a
            readable checkpoint.
    """
    if mode == "never":
        return None
    if mode == "auto":
        found = ckpt.find_resumable(checkpoints)
        if found is None:
            return None
        log.info("resuming from %s", found[0])
        return found[1]
    try:
        return ckpt.load_checkpoint(Path(mode).expanduser())
    except CheckpointError as exc:
        raise CheckpointError(f"resume: {exc}") from None


def build_model(
    config: TrainConfig, num_classes: int, resume: Checkpoint | None
) -> tuple[nn.Module, Preprocessing, str]:
    """The model with its starting weights (or the resumed ones), its preprocessing, its source.

    Raises:
        ConfigError: the resumed checkpoint is another architecture or class count, or the
            image size does not fit the architecture.
    """
    model = create_model(
        config.arch, num_classes, head_hidden=config.head_hidden, head_dropout=config.head_dropout
    )
    if resume is not None:
        header = resume.header
        if header.arch != config.arch or header.num_classes != num_classes:
            raise ConfigError(
                f"resume: the checkpoint is a {header.arch} with {header.num_classes} "
                f"classes; this run is a {config.arch} with {num_classes}; use "
                "--resume never or another --output"
            )
        model.load_state_dict(resume.model_state)
        return model, header.preprocessing, header.weights
    weights = resolve_weights(config.arch, config.weights)
    if config.init == INIT_RANDOM:
        # Only the weights' preprocessing is used; the random initialisation is the seeded one
        # that --init auto tests (trainer.stages.init_choice).
        log.info("init random: the --weights' values are not loaded, their preprocessing is")
        model = random_initialisation(config, num_classes)
        return model, preprocessing_for(weights, config.image_size), weights.source
    dropped = load_starting_weights(model, weights)
    if dropped:
        log.info(
            "new %d-class head; the source head (%d tensors) was dropped", num_classes, len(dropped)
        )
    pre = preprocessing_for(weights, config.image_size)
    vit_size = getattr(model, "image_size", None)
    if family(config.arch) == "vit" and vit_size != pre.input_size[0]:
        raise ConfigError(
            f"image_size: {config.arch} takes {vit_size} px inputs, not {pre.input_size[0]}"
        )
    return model, pre, weights.source


def plan_phases(config: TrainConfig, group_names: list[str]) -> list[Phase]:
    """The phases of a resolved config (``resolve_defaults`` filled every default).

    Before phase 2's policy, LR and decay are chosen from the data (``trainer.finetune.choice``),
    their classic values stand in: the plan is then only read for which phases run.

    Raises:
        ConfigError: both phases have zero epochs.
    """
    assert config.head_epochs is not None
    if trains_from_scratch(config):
        log.info(
            "weights none: training from scratch, so phase 2 trains %s layer groups and the "
            "head phase runs only when --head-epochs is given (head_epochs=%d)",
            config.unfreeze,
            config.head_epochs,
        )
    head_epochs, finetune_epochs = config.head_epochs, config.finetune_epochs
    if config.init == INIT_RANDOM:
        # The from-scratch recipe trains every layer in every epoch: a head phase on random
        # features would only delay it.
        head_epochs, finetune_epochs = 0, head_epochs + finetune_epochs
    phases = build_phases(
        group_names,
        head_epochs=head_epochs,
        finetune_epochs=finetune_epochs,
        policy=config.unfreeze or FALLBACK_POLICY,
        lr=config.lr if config.lr is not None else FALLBACK_LR,
        head_lr=config.head_lr,
        lr_decay=config.lr_decay if config.lr_decay is not None else FALLBACK_LR_DECAY,
        freeze_bn=bool(config.freeze_bn),
    )
    if not phases:
        raise ConfigError("head_epochs and finetune_epochs are both 0: nothing to train")
    return phases


def _header(
    config: TrainConfig, split: DatasetSplit, pre: Preprocessing, weights_source: str
) -> CheckpointHeader:
    return CheckpointHeader(
        arch=config.arch,
        classes=tuple(split.classes),
        head=HeadSpec(config.head_hidden, config.head_dropout),
        preprocessing=pre,
        weights=weights_source,
        dataset_fingerprint=split.fingerprint,
        config=config.to_dict(),
    )


def _place_model(model: nn.Module, groups: list[LayerGroup], context: RunContext) -> TrainedModel:
    config = context.config
    model.to(context.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        if config.ema
        else None
    )
    return TrainedModel(model, ema, groups)


def _open_metrics_log(context: RunContext, resume: Checkpoint | None) -> MetricsLog | None:
    if not context.is_main:
        return None
    metrics = MetricsLog(context.output / "metrics.jsonl")
    # A resumed run drops the records of epochs its checkpoint does not include.
    metrics.truncate(resume.progress.global_epoch if resume is not None else 0)
    return metrics


# ---- end of run ------------------------------------------------------------------------------


def already_finished(
    context: RunContext, resume: Checkpoint, *, export_asked: bool
) -> dict[str, Any] | None:
    """A finished run re-run: nothing is trained, ``config.yaml`` is left as it ran.

    Returns None when the run's end (calibration, report, export, ``summary.json``) did not
    complete: the caller then does it. Exports ``best.pt`` again only when asked
    (``--export`` given on the re-run).
    """
    path = context.output / "summary.json"
    if not path.is_file():
        log.info("training is finished; completing the run's end (summary.json is missing)")
        return None
    summary: dict[str, Any] = json.loads(path.read_text())
    log_event(
        log,
        "already_finished",
        global_epochs=resume.progress.global_epoch,
        best_val_accuracy=resume.progress.best_val_accuracy,
        export=export_asked,
    )
    log.info(
        "the run in %s finished before (%d epochs): nothing to train%s",
        context.output,
        resume.progress.global_epoch,
        "; exporting best.pt again as asked" if export_asked else "",
    )
    if export_asked and context.is_main:
        summary |= _export(context)
        write_summary(path, summary)
    return summary | {"status": ALREADY_FINISHED}


def _export_asked(config: TrainConfig, given: Collection[str] | None) -> bool:
    """Whether this re-run asked for an export itself (not by the recorded default)."""
    return config.export and (given is None or "export" in given)


def finish_run(
    context: RunContext,
    progress: Progress,
    seconds: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary; rank 0 also writes the report, exports ``best.pt`` and ``summary.json``.

    ``extra`` (the head phase, augmentation and class-balance facts) joins the summary.
    """
    config = context.config
    classes = list(context.header.classes)
    summary: dict[str, Any] = {
        "status": "completed",
        "best_val_accuracy": progress.best_val_accuracy,
        "classes": classes,
        "arch": config.arch,
        "weights": context.header.weights,
        "best_checkpoint": str(context.best_checkpoint),
        "last_checkpoint": str(context.last_checkpoint),
        "global_epochs": progress.global_epoch,
        "phases": {name: s.summary() for name, s in progress.stats.items()},
        "wall_seconds": round(seconds, 2),
        "model_repository": None,
        "model_name": None,
        "model_version": None,
    } | (extra or {})
    if not context.is_main:
        return summary
    summary["near_chance"] = warn_if_near_chance(
        log, "this run", progress.best_val_accuracy, len(classes)
    )
    _write_report(context, progress)
    write_strategies(context.output / "report" / "strategies.md", summary)
    if config.export:
        summary |= _export(context)
    write_summary(context.output / "summary.json", summary)
    log_event(log, "run_end", best_val_accuracy=progress.best_val_accuracy, seconds=seconds)
    return summary


def _write_report(context: RunContext, progress: Progress) -> None:
    # Imported here: matplotlib (the train extra's) costs its import only at the run's end.
    from trainer.evaluation.report import write_report

    size = context.header.num_classes
    confusion = np.asarray(progress.best_confusion or np.zeros((size, size)), dtype=np.int64)
    write_report(
        context.output / "report",
        context.output / "metrics.jsonl",
        confusion,
        list(context.header.classes),
    )


def _export(context: RunContext) -> dict[str, Any]:
    from trainer.export import export_checkpoint

    config = context.config
    repository = Path(config.repository or context.output / "model_repository")
    result = export_checkpoint(
        context.best_checkpoint,
        repository,
        model_name=config.model_name,
        input_format=config.input_format,
        precision=config.precision,
        data_dir=config.data,
    )
    log_event(log, "exported", repository=str(repository), version=result.version)
    return {
        "model_repository": str(repository),
        "model_name": config.model_name,
        "model_version": result.version,
        "export_max_abs_diff": result.max_abs_diff,
    }
