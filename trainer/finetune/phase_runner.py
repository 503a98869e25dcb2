"""The phases of one rank: enter a phase, train its epochs, evaluate, record, checkpoint.

``PhaseRunner`` is given everything it uses (``RunContext``, the model, the input pipeline,
how a step computes, where records go) by ``trainer.run`` and returns what happened; it writes
checkpoints and metric records, nothing else. One phase is a few named steps: ``_enter``
(resume positioning, optimizer and schedule), ``_maybe_unfreeze``, ``_train_epoch``,
``_evaluate_and_record`` and the early-stop decision.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.optim.swa_utils import AveragedModel

from contracts.atomic_files import atomic_write_bytes
from trainer import checkpoint as ckpt
from trainer.checkpoint import Checkpoint, PhaseStats, Position, Progress, TrainingState
from trainer.data.input_pipeline import Pipeline
from trainer.finetune.frozen_prefix import training_view
from trainer.finetune.loop import (
    EpochControl,
    EpochResult,
    EvalResult,
    StepSetup,
    WeightUpdate,
    evaluate,
    train_one_epoch,
)
from trainer.finetune.phases import (
    FINETUNE_PHASE,
    Phase,
    build_optimizer,
    build_scheduler,
    carry_optimizer_state,
    learning_rates,
    set_trainable,
    train_mode,
)
from trainer.head.fit import HeadFit
from trainer.job.context import RunContext
from trainer.job.metrics_log import MetricsLog
from trainer.job.stopping import StopRequest
from trainer.job.telemetry import TrainingTelemetry
from trainer.job.trainjob_progress import TrainJobProgress
from trainer.model.classifier import unwrap
from trainer.model.layer_groups import HEAD, LayerGroup
from trainer.progress import log_event

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"
DONE = "done"
# Sampler epochs of different phases never collide: phase index * this + epoch.
_PHASE_EPOCH_STRIDE = 100_000


@dataclass(frozen=True)
class TrainedModel:
    """The network being trained, its EMA copy (when kept) and its layer groups."""

    module: nn.Module
    ema: AveragedModel | None
    groups: list[LayerGroup]

    @property
    def evaluated(self) -> nn.Module:
        """The weights evaluated and kept as the best model: the EMA when there is one."""
        return self.ema.module if self.ema is not None else unwrap(self.module)


@dataclass(frozen=True)
class TrainingParts:
    """What the phases, and each stage around them, train and evaluate with: the model, the
    input pipeline and how a step computes (all built once by ``trainer.run``)."""

    trained: TrainedModel
    pipeline: Pipeline
    step: StepSetup


def evaluate_on_val(
    model: nn.Module, pipeline: Pipeline, step: StepSetup, context: RunContext
) -> EvalResult:
    """``model`` on the run's val split, prepared and in the precision the steps use (summed
    over ranks under DDP)."""
    return evaluate(
        model,
        pipeline.eval_batches(),
        step,
        num_classes=context.header.num_classes,
        distributed=context.dist.enabled,
    )


@dataclass(frozen=True)
class RunObservers:
    """Where the run reports to and listens for a stop (built and closed by ``trainer.run``)."""

    metrics: MetricsLog | None
    telemetry: TrainingTelemetry
    stop: StopRequest
    # Rank 0 inside a Kubeflow TrainJob: each finished epoch goes to the TrainJob's status.
    trainjob: TrainJobProgress | None = None

    def epoch_end(self, record: dict[str, Any]) -> None:
        """A finished epoch's record, for the observers that take one."""
        if self.trainjob is not None:
            self.trainjob.epoch_end(
                phase=record["phase"],
                epoch=record["epoch"],
                train_loss=record["train_loss"],
                val_accuracy=record["val_accuracy"],
                epoch_seconds=record["epoch_seconds"],
            )

    def phases_done(self) -> None:
        """Every phase ran to its end (early stops included)."""
        if self.trainjob is not None:
            self.trainjob.training_done()


@dataclass(frozen=True)
class PhasesOutcome:
    """How the phases ended (``DONE`` or ``INTERRUPTED``) and the progress they made."""

    status: str
    progress: Progress


@dataclass
class _PhaseCursor:
    """The state of the phase being trained."""

    phase: Phase
    stats: PhaseStats
    epoch: int
    step: int
    trainable: tuple[str, ...]
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    wrapped: nn.Module


def record_val_accuracy(progress: Progress, stats: PhaseStats, accuracy: float) -> bool:
    """Update the run's best and the phase's patience with one epoch's val accuracy.

    Returns whether the run's best (what ``best.pt`` holds) improved. Patience counts from the
    phase's own best, so phase 2 is stopped when its curve stops climbing, not when it has
    not yet passed the probe: the flat policy falls below the probe first and overtakes it
    epochs later (``trainer.finetune.choice.late_winner``).
    """
    improved = accuracy > progress.best_val_accuracy
    if improved:
        progress.best_val_accuracy = accuracy
    if accuracy > stats.best_val_accuracy:
        stats.best_val_accuracy = accuracy
        progress.epochs_since_best = 0
    else:
        progress.epochs_since_best += 1
    return improved


class PhaseRunner:
    """Runs the phases of one rank; rank 0 alone writes checkpoints and metrics."""

    def __init__(self, context: RunContext, parts: TrainingParts, observers: RunObservers) -> None:
        self.context = context
        self.config = context.config
        self.model = parts.trained
        self.pipeline = parts.pipeline
        self.step = parts.step
        self.observers = observers
        self.progress = Progress()

    def run_phases(self, phases: list[Phase], resume: Checkpoint | None) -> PhasesOutcome:
        """Train ``phases`` in order, continuing from ``resume`` when given."""
        if resume is not None:
            self._restore(resume)
        for phase in phases:
            order = ckpt.PHASE_ORDER[phase.name]
            if resume is not None and order < resume.position.phase_index:
                continue
            here = resume if resume is not None and resume.position.phase_index == order else None
            if self._run_phase(phase, here) == INTERRUPTED:
                return PhasesOutcome(INTERRUPTED, self.progress)
        self.observers.phases_done()
        return PhasesOutcome(DONE, self.progress)

    def record_fitted_head(self, phase: Phase, fit: HeadFit) -> None:
        """The head phase done on cached features (``trainer.head.stage``): its stats, its
        metrics record and a checkpoint positioned at the phase's end, so a resumed run goes
        straight to phase 2 and ``best.pt`` exists even when phase 2 never beats the head."""
        stats = self.progress.stats.setdefault(phase.name, PhaseStats())
        stats.epochs += 1
        stats.images += fit.train_rows
        stats.train_seconds += fit.seconds
        stats.wall_seconds += fit.seconds
        stats.best_val_accuracy = fit.val_accuracy
        progress = self.progress
        progress.global_epoch += 1
        progress.best_val_accuracy = fit.val_accuracy
        progress.best_confusion = fit.confusion
        progress.epochs_since_best = 0
        if self.model.ema is not None:
            self.model.ema.module.load_state_dict(unwrap(self.model.module).state_dict())
        record: dict[str, Any] = {
            "phase": phase.name,
            "epoch": phase.epochs,
            "global_epoch": progress.global_epoch,
            "train_loss": fit.train_loss,
            "val_loss": fit.val_loss,
            "val_accuracy": fit.val_accuracy,
            "lrs": {},
            "images_per_second": fit.train_rows / fit.seconds if fit.seconds else 0.0,
            "epoch_seconds": fit.seconds,
            "trainable_groups": [HEAD],
            "best": True,
            "head_fit": fit.method,
        }
        if self.observers.metrics is not None:
            self.observers.metrics.append(record)
        log_event(log, "epoch_end", **{k: v for k, v in record.items() if k != "lrs"})
        self.observers.epoch_end(record)
        if self.context.is_main:
            checkpoint = Checkpoint(
                header=self.context.header,
                position=Position(ckpt.PHASE_ORDER[phase.name], phase.epochs, ckpt.EPOCH_DONE),
                progress=progress,
                model_state=unwrap(self.model.module).state_dict(),
                ema_state=self.model.ema.module.state_dict() if self.model.ema else None,
                training=TrainingState(rng=ckpt.rng_state()),
            )
            ckpt.save(self.context.checkpoints, ckpt.serialize(checkpoint), best=True)

    def _restore(self, resume: Checkpoint) -> None:
        self.progress = resume.progress
        if self.model.ema is not None and resume.ema_state is not None:
            self.model.ema.module.load_state_dict(resume.ema_state)
            self.model.ema.n_averaged.fill_(1)
        if resume.training.rng:
            # Nothing draws random numbers between here and the next step: the resumed run's
            # dropout and MixUp draws continue exactly where the stopped run left off.
            ckpt.restore_rng_state(resume.training.rng)

    # ---- one phase ----------------------------------------------------------------------

    def _run_phase(self, phase: Phase, resume: Checkpoint | None) -> str:
        cursor = self._enter(phase, resume)
        if cursor is None:
            return DONE
        for epoch in range(cursor.epoch, phase.epochs + 1):
            cursor.epoch = epoch
            epoch_started = time.perf_counter()
            self._maybe_unfreeze(cursor)
            result = self._train_epoch(cursor)
            if result.interrupted:
                cursor.stats.wall_seconds += time.perf_counter() - epoch_started
                self._save(cursor, cursor.step + result.steps, best=False)
                return INTERRUPTED
            cursor.step = 0
            improved = self._evaluate_and_record(cursor, result, epoch_started)
            self._save(cursor, ckpt.EPOCH_DONE, best=improved)
            if self.observers.stop.should_stop():
                return INTERRUPTED
            if cursor.stats.early_stopped:
                log_event(
                    log, "early_stop", phase=phase.name, epoch=epoch, patience=self.config.patience
                )
                break
        return DONE

    def _enter(self, phase: Phase, resume: Checkpoint | None) -> _PhaseCursor | None:
        """Position the phase (start, or where ``resume`` stopped) and build its optimizer.

        Returns None when ``resume`` shows the phase already finished.
        """
        stats = self.progress.stats.setdefault(phase.name, PhaseStats())
        epoch, step = 1, 0
        if resume is not None:
            epoch, step = resume.position.epoch, resume.position.step
            if step == ckpt.EPOCH_DONE:
                epoch, step = epoch + 1, 0
            if epoch > phase.epochs or stats.early_stopped:
                return None
        else:
            self.progress.epochs_since_best = 0
            self._keep_start_of_phase_2(phase)
        trainable = phase.groups_at(resume.position.epoch if resume is not None else epoch)
        set_trainable(self.model.module, self.model.groups, trainable)
        optimizer = build_optimizer(
            self.model.module, self.model.groups, trainable, phase.lrs, self.config.weight_decay
        )
        if resume is not None:
            optimizer.load_state_dict(resume.training.optimizer or {})
            if self.step.scaler is not None and resume.training.scaler:
                self.step.scaler.load_state_dict(resume.training.scaler)
        spe = self.pipeline.steps_per_epoch
        scheduler = build_scheduler(
            optimizer, phase.epochs * spe, self.config.warmup_fraction, (epoch - 1) * spe + step
        )
        log_event(
            log,
            "phase_start",
            phase=phase.name,
            epochs=phase.epochs,
            trainable_groups=",".join(trainable),
            start_epoch=epoch,
            start_step=step,
            steps_per_epoch=spe,
        )
        self.observers.telemetry.update(phase=phase.name)
        return _PhaseCursor(
            phase, stats, epoch, step, trainable, optimizer, scheduler, self._wrap()
        )

    def _keep_start_of_phase_2(self, phase: Phase) -> None:
        """A copy of ``best.pt`` as phase 2 starts (the head phase's model): one end of the
        weight interpolation after the phases (``trainer.stages.interpolation``), kept only
        when that is on."""
        best = self.context.best_checkpoint
        asked = self.config.weight_interpolation == "on"
        if asked and phase.name == FINETUNE_PHASE and self.context.is_main and best.is_file():
            atomic_write_bytes(self.context.phase_2_start_checkpoint, best.read_bytes())

    def _maybe_unfreeze(self, cursor: _PhaseCursor) -> None:
        """Unfreeze more groups when the phase's policy says so at this epoch."""
        now = cursor.phase.groups_at(cursor.epoch)
        if now == cursor.trainable:
            return
        cursor.trainable = now
        set_trainable(self.model.module, self.model.groups, now)
        fresh = build_optimizer(
            self.model.module, self.model.groups, now, cursor.phase.lrs, self.config.weight_decay
        )
        carry_optimizer_state(cursor.optimizer, fresh)
        cursor.optimizer = fresh
        spe = self.pipeline.steps_per_epoch
        cursor.scheduler = build_scheduler(
            fresh,
            cursor.phase.epochs * spe,
            self.config.warmup_fraction,
            (cursor.epoch - 1) * spe + cursor.step,
        )
        # requires_grad changes do not reach an existing DDP wrapper or compiled graph.
        cursor.wrapped = self._wrap()
        log_event(
            log, "unfreeze", phase=cursor.phase.name, epoch=cursor.epoch, groups=",".join(now)
        )

    def _wrap(self) -> nn.Module:
        # What the steps run: the frozen prefix folded and without autograd, then the model's
        # own trainable groups (trainer.finetune.frozen_prefix). It copies the frozen weights of
        # this moment, so it is built again at each phase entry and unfreeze, like DDP and
        # compile.
        model: nn.Module = training_view(
            self.model.module,
            self.config.arch,
            self.model.groups,
            channels_last=bool(self.config.channels_last),
        )
        if self.context.dist.enabled:
            device = self.context.device
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if self.config.compile:
            # A fresh compile per phase: guards on requires_grad would recompile anyway.
            torch._dynamo.reset()
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    def _train_epoch(self, cursor: _PhaseCursor) -> EpochResult:
        phase, epoch = cursor.phase, cursor.epoch
        train_mode(self.model.module, self.model.groups, cursor.trainable, phase.freeze_bn)
        sampler = self.pipeline.sampler
        sampler.set_epoch(ckpt.PHASE_ORDER[phase.name] * _PHASE_EPOCH_STRIDE + epoch)
        sampler.set_start(cursor.step * self.config.batch_size)
        telemetry = self.observers.telemetry
        telemetry.update(epoch=epoch)
        # Phase 2's extra loss terms apply to phase 2 alone.
        step = self.step if phase.name == FINETUNE_PHASE else self.step.without_penalty()
        if step.penalty is not None:
            spe = self.pipeline.steps_per_epoch
            step.penalty.begin_epoch((epoch - 1) * spe + cursor.step, phase.epochs * spe)
        result = train_one_epoch(
            cursor.wrapped,
            self.pipeline.train_loader,
            step,
            WeightUpdate(cursor.optimizer, cursor.scheduler, self.config.grad_clip, self.model.ema),
            EpochControl(
                total=len(self.pipeline.train_loader),
                desc=f"{phase.name} {epoch}/{phase.epochs}",
                show_progress=None if self.context.is_main else False,
                should_stop=self.observers.stop.should_stop,
                on_step=(lambda done, loss: telemetry.update(step=done, loss=loss))
                if telemetry.enabled
                else None,
                distributed=self.context.dist.enabled,
            ),
        )
        cursor.stats.images += result.images * self.context.dist.world_size
        cursor.stats.train_seconds += result.seconds
        return result

    def _evaluate_and_record(
        self, cursor: _PhaseCursor, result: EpochResult, epoch_started: float
    ) -> bool:
        """Evaluate, update the best score and the early-stop decision, record the epoch.

        Returns whether the val accuracy improved on the best so far.
        """
        evaluated = evaluate_on_val(self.model.evaluated, self.pipeline, self.step, self.context)
        progress = self.progress
        progress.global_epoch += 1
        cursor.stats.epochs += 1
        improved = record_val_accuracy(progress, cursor.stats, evaluated.accuracy)
        if improved:
            progress.best_confusion = evaluated.confusion.tolist()
        cursor.stats.early_stopped = (
            progress.epochs_since_best >= self.config.patience
            and cursor.epoch < cursor.phase.epochs
        )
        cursor.stats.wall_seconds += time.perf_counter() - epoch_started
        self._record(cursor, result, evaluated, improved, epoch_started)
        return improved

    def _record(
        self,
        cursor: _PhaseCursor,
        result: EpochResult,
        evaluated: EvalResult,
        improved: bool,
        epoch_started: float,
    ) -> None:
        world = self.context.dist.world_size
        # The schedule is per optimizer step (warmup, then cosine), so the report plots each
        # group's LR at up to 64 evenly spaced steps of the epoch, first and last included:
        # the LR of step s of the phase is base_lr * lambda(s), as LambdaLR computes it.
        spe = self.pipeline.steps_per_epoch
        points = min(spe, 64)
        lr_steps = sorted({round(i * (spe - 1) / max(1, points - 1)) for i in range(points)})
        first = (cursor.epoch - 1) * spe
        step_lrs: dict[str, list[float]] = {}
        if isinstance(cursor.scheduler, LambdaLR):
            for group, base, factor in zip(
                cursor.optimizer.param_groups,
                cursor.scheduler.base_lrs,
                cursor.scheduler.lr_lambdas,
                strict=True,
            ):
                rates = [float(base) * factor(first + j) for j in lr_steps]
                step_lrs.setdefault(group["group"], rates)
        record: dict[str, Any] = {
            "phase": cursor.phase.name,
            "epoch": cursor.epoch,
            "global_epoch": self.progress.global_epoch,
            "train_loss": result.loss,
            "val_loss": evaluated.loss,
            "val_accuracy": evaluated.accuracy,
            "lrs": {k.removeprefix("lr/"): v for k, v in learning_rates(cursor.optimizer).items()},
            "images_per_second": result.images_per_second * world,
            "epoch_seconds": time.perf_counter() - epoch_started,
            "trainable_groups": list(cursor.trainable),
            "best": improved,
        }
        if step_lrs:
            record |= {"steps_per_epoch": spe, "lr_steps": lr_steps, "step_lrs": step_lrs}
        if result.penalties:
            record["penalties"] = result.penalties
        if self.observers.metrics is not None:
            self.observers.metrics.append(record)
        unlogged = ("lrs", "lr_steps", "step_lrs")
        log_event(log, "epoch_end", **{k: v for k, v in record.items() if k not in unlogged})
        self.observers.epoch_end(record)
        self.observers.telemetry.update(
            val_accuracy=evaluated.accuracy, images_per_second=result.images_per_second * world
        )

    def _save(self, cursor: _PhaseCursor, step: int, *, best: bool) -> None:
        if not self.context.is_main:
            return
        checkpoint = Checkpoint(
            header=self.context.header,
            position=Position(ckpt.PHASE_ORDER[cursor.phase.name], cursor.epoch, step),
            progress=self.progress,
            model_state=unwrap(self.model.module).state_dict(),
            ema_state=self.model.ema.module.state_dict() if self.model.ema is not None else None,
            training=TrainingState(
                optimizer=cursor.optimizer.state_dict(),
                scheduler=cursor.scheduler.state_dict(),
                scaler=self.step.scaler.state_dict() if self.step.scaler is not None else None,
                rng=ckpt.rng_state(),
            ),
        )
        ckpt.save(self.context.checkpoints, ckpt.serialize(checkpoint), best=best)
