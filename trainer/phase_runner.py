"""The phases of a run: epochs, evaluation, checkpoints, early stopping, then the outputs."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

from trainer import checkpoint as ckpt
from trainer.layer_groups import LayerGroup
from trainer.loop import Mixer, evaluate, train_one_epoch
from trainer.metrics_log import MetricsLog, write_summary
from trainer.models import unwrap
from trainer.phases import (
    Phase,
    build_optimizer,
    build_scheduler,
    carry_optimizer_state,
    learning_rates,
    set_trainable,
    train_mode,
)
from trainer.pipeline import Pipeline
from trainer.progress import log_event
from trainer.stopping import StopRequest
from trainer.telemetry import TrainingTelemetry

if TYPE_CHECKING:
    from trainer.run import Run

log = logging.getLogger(__name__)


@dataclass
class PhaseStats:
    """Throughput and time of one phase (kept across resumes in the checkpoint)."""

    epochs: int = 0
    images: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    early_stopped: bool = False

    def summary(self) -> dict[str, Any]:
        ips = self.images / self.train_seconds if self.train_seconds else 0.0
        return {
            "epochs": self.epochs,
            "images_per_second": round(ips, 2),
            "wall_seconds": round(self.wall_seconds, 2),
            "early_stopped": self.early_stopped,
        }


@dataclass
class RunState:
    """What changes as the run goes: position, best score, per-phase stats."""

    global_epoch: int = 0
    best_val_accuracy: float = -1.0
    epochs_since_best: int = 0
    best_confusion: list[list[int]] | None = None
    stats: dict[str, PhaseStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs_since_best": self.epochs_since_best,
            "best_confusion": self.best_confusion,
            "phase_stats": {k: dataclasses.asdict(v) for k, v in self.stats.items()},
        }


INTERRUPTED = "interrupted"
DONE = "done"


class PhaseRunner:
    """Runs the phases of one rank; rank 0 alone writes files and exports."""

    def __init__(
        self,
        *,
        run: Run,
        model: nn.Module,
        ema: AveragedModel | None,
        groups: list[LayerGroup],
        pipeline: Pipeline,
        prepare: Callable[[torch.Tensor], torch.Tensor],
        mixer: Mixer | None,
        amp_dtype: torch.dtype | None,
        scaler: torch.amp.GradScaler | None,
        num_classes: int,
    ) -> None:
        self.run = run
        self.config = run.config
        self.model = model
        self.ema = ema
        self.groups = groups
        self.pipeline = pipeline
        self.prepare = prepare
        self.mixer = mixer
        self.amp_dtype = amp_dtype
        self.scaler = scaler
        self.num_classes = num_classes
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing)
        self.state = RunState()
        self.is_main = run.info.is_main
        self.metrics: MetricsLog | None = None

    # ---- the whole run ------------------------------------------------------------------

    def run_all(
        self, phases: list[Phase], resume: dict[str, Any] | None, classes: list[str]
    ) -> dict[str, Any]:
        config = self.config
        started = time.perf_counter()
        resume_at = self._restore(resume) if resume is not None else None
        if resume is not None and resume.get("rng_state"):
            # Nothing draws random numbers between here and the next step: the resumed run's
            # dropout and MixUp draws continue exactly where the stopped run left off.
            ckpt.restore_rng_state(resume["rng_state"])
        if self.is_main:
            self.metrics = MetricsLog(self.run.output / "metrics.jsonl")
            self.metrics.truncate(self.state.global_epoch)
        telemetry = TrainingTelemetry(config.metrics_port if self.is_main else None)
        stop = StopRequest(
            config.stop_timeout, distributed=self.run.info.enabled, device=self.run.device
        )
        stop.install()
        try:
            for phase in phases:
                order = ckpt.PHASE_ORDER[phase.name]
                here = (
                    resume_at if resume_at is not None and resume_at.phase_index == order else None
                )
                if resume_at is not None and order < resume_at.phase_index:
                    continue
                outcome = self._run_phase(phase, here, resume, telemetry, stop)
                if outcome == INTERRUPTED:
                    log_event(log, "stopped", reason="signal", checkpoint=str(self._last_path()))
                    return {"status": INTERRUPTED, "checkpoint": str(self._last_path())}
        finally:
            stop.uninstall()
            telemetry.close()
        return self._finish(classes, time.perf_counter() - started)

    def _restore(self, resume: dict[str, Any]) -> ckpt.Position:
        self.state.global_epoch = int(resume["global_epoch"])
        self.state.best_val_accuracy = float(resume["best_val_accuracy"])
        self.state.epochs_since_best = int(resume.get("epochs_since_best", 0))
        self.state.best_confusion = resume.get("best_confusion")
        for name, stats in (resume.get("phase_stats") or {}).items():
            self.state.stats[name] = PhaseStats(**stats)
        if self.ema is not None and resume.get("ema_state") is not None:
            self.ema.module.load_state_dict(resume["ema_state"])
            self.ema.n_averaged.fill_(1)
        return ckpt.position(resume)

    # ---- one phase ----------------------------------------------------------------------

    def _run_phase(
        self,
        phase: Phase,
        resume_at: ckpt.Position | None,
        resume: dict[str, Any] | None,
        telemetry: TrainingTelemetry,
        stop: StopRequest,
    ) -> str:
        config = self.config
        spe = self.pipeline.steps_per_epoch
        total_steps = phase.epochs * spe
        stats = self.state.stats.setdefault(phase.name, PhaseStats())
        first_epoch, first_step = 1, 0
        if resume_at is not None:
            first_epoch, first_step = resume_at.epoch, resume_at.step
            if first_step == ckpt.EPOCH_DONE:
                first_epoch, first_step = first_epoch + 1, 0
            if first_epoch > phase.epochs or stats.early_stopped:
                return DONE
        else:
            self.state.epochs_since_best = 0
        trainable = phase.groups_at(resume_at.epoch if resume_at is not None else first_epoch)
        set_trainable(self.model, self.groups, trainable)
        optimizer = build_optimizer(
            self.model, self.groups, trainable, phase.lrs, config.weight_decay
        )
        position = (first_epoch - 1) * spe + first_step
        if resume_at is not None and resume is not None:
            optimizer.load_state_dict(resume["optimizer_state"])
            if self.scaler is not None and resume.get("scaler_state"):
                self.scaler.load_state_dict(resume["scaler_state"])
        scheduler = build_scheduler(optimizer, total_steps, config.warmup_fraction, position)
        wrapped = self._wrap()
        log_event(
            log,
            "phase_start",
            phase=phase.name,
            epochs=phase.epochs,
            trainable_groups=",".join(trainable),
            start_epoch=first_epoch,
            start_step=first_step,
            steps_per_epoch=spe,
        )
        telemetry.update(phase=phase.name)
        for epoch in range(first_epoch, phase.epochs + 1):
            epoch_started = time.perf_counter()
            now = phase.groups_at(epoch)
            if now != trainable:
                trainable = now
                set_trainable(self.model, self.groups, trainable)
                fresh = build_optimizer(
                    self.model, self.groups, trainable, phase.lrs, config.weight_decay
                )
                carry_optimizer_state(optimizer, fresh)
                optimizer = fresh
                scheduler = build_scheduler(
                    optimizer, total_steps, config.warmup_fraction, (epoch - 1) * spe + first_step
                )
                # requires_grad changes do not reach an existing DDP wrapper or compiled graph.
                wrapped = self._wrap()
                log_event(log, "unfreeze", phase=phase.name, epoch=epoch, groups=",".join(now))
            train_mode(self.model, self.groups, trainable, phase.freeze_bn)
            sampler = self.pipeline.sampler
            sampler.set_epoch(ckpt.PHASE_ORDER[phase.name] * 100_000 + epoch)
            sampler.set_start(first_step * config.batch_size)
            telemetry.update(epoch=epoch)
            result = train_one_epoch(
                wrapped,
                self.pipeline.train_loader,
                optimizer=optimizer,
                scheduler=scheduler,
                prepare=self.prepare,
                loss_fn=self.loss_fn,
                device=self.run.device,
                amp_dtype=self.amp_dtype,
                scaler=self.scaler,
                grad_clip=config.grad_clip,
                mixer=self.mixer,
                ema=self.ema,
                total=len(self.pipeline.train_loader),
                desc=f"{phase.name} {epoch}/{phase.epochs}",
                show_progress=None if self.is_main else False,
                should_stop=stop.should_stop,
                distributed=self.run.info.enabled,
                on_step=(lambda step, loss: telemetry.update(step=step, loss=loss))
                if telemetry.enabled
                else None,
            )
            stats.images += result.images * self.run.info.world_size
            stats.train_seconds += result.seconds
            if result.interrupted:
                stats.wall_seconds += time.perf_counter() - epoch_started
                self._save(phase, epoch, first_step + result.steps, optimizer, scheduler, False)
                return INTERRUPTED
            first_step = 0
            evaluated = evaluate(
                self.ema.module if self.ema is not None else unwrap(self.model),
                self.pipeline.eval_batches(),
                prepare=self.prepare,
                num_classes=self.num_classes,
                device=self.run.device,
                amp_dtype=self.amp_dtype,
                distributed=self.run.info.enabled,
            )
            self.state.global_epoch += 1
            stats.epochs += 1
            improved = evaluated.accuracy > self.state.best_val_accuracy
            if improved:
                self.state.best_val_accuracy = evaluated.accuracy
                self.state.best_confusion = evaluated.confusion.tolist()
                self.state.epochs_since_best = 0
            else:
                self.state.epochs_since_best += 1
            early_stop = self.state.epochs_since_best >= config.patience and epoch < phase.epochs
            stats.early_stopped = early_stop
            stats.wall_seconds += time.perf_counter() - epoch_started
            record = {
                "phase": phase.name,
                "epoch": epoch,
                "global_epoch": self.state.global_epoch,
                "train_loss": result.loss,
                "val_loss": evaluated.loss,
                "val_accuracy": evaluated.accuracy,
                "lrs": {k.removeprefix("lr/"): v for k, v in learning_rates(optimizer).items()},
                "images_per_second": result.images_per_second * self.run.info.world_size,
                "epoch_seconds": time.perf_counter() - epoch_started,
                "trainable_groups": list(trainable),
                "best": improved,
            }
            if self.metrics is not None:
                self.metrics.append(record)
            log_event(log, "epoch_end", **{k: v for k, v in record.items() if k != "lrs"})
            telemetry.update(
                val_accuracy=evaluated.accuracy,
                images_per_second=result.images_per_second * self.run.info.world_size,
            )
            self._save(phase, epoch, ckpt.EPOCH_DONE, optimizer, scheduler, improved)
            if stop.should_stop():
                return INTERRUPTED
            if early_stop:
                log_event(
                    log, "early_stop", phase=phase.name, epoch=epoch, patience=config.patience
                )
                break
        return DONE

    def _wrap(self) -> nn.Module:
        model: nn.Module = self.model
        if self.run.info.enabled:
            device = self.run.device
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if self.config.compile:
            # A fresh compile per phase: guards on requires_grad would recompile anyway.
            torch._dynamo.reset()
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    # ---- checkpoints and outputs --------------------------------------------------------

    def _last_path(self) -> Path:
        return self.run.checkpoints / ckpt.LAST

    def _save(
        self,
        phase: Phase,
        epoch: int,
        step: int,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        best: bool,
    ) -> None:
        if not self.is_main:
            return
        completed = {
            name: self.state.stats.get(name, PhaseStats()).epochs for name in ckpt.PHASE_ORDER
        }
        checkpoint = {
            "format": ckpt.CHECKPOINT_FORMAT,
            "format_version": ckpt.FORMAT_VERSION,
            **self.run.static,
            "model_state": unwrap(self.model).state_dict(),
            "ema_state": self.ema.module.state_dict() if self.ema is not None else None,
            "phase": phase.name,
            "epoch": epoch,
            "step": step,
            "global_epoch": self.state.global_epoch,
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler is not None else None,
            "rng_state": ckpt.rng_state(),
            "best_val_accuracy": self.state.best_val_accuracy,
            "epochs": completed,
            **self.state.to_dict(),
        }
        ckpt.save(self.run.checkpoints, ckpt.serialize(checkpoint), best=best)

    def _finish(self, classes: list[str], seconds: float) -> dict[str, Any]:
        config = self.config
        output = self.run.output
        best_path = self.run.checkpoints / ckpt.BEST
        summary: dict[str, Any] = {
            "status": "completed",
            "best_val_accuracy": self.state.best_val_accuracy,
            "classes": classes,
            "arch": config.arch,
            "weights": self.run.static["weights"],
            "best_checkpoint": str(best_path),
            "last_checkpoint": str(self._last_path()),
            "global_epochs": self.state.global_epoch,
            "phases": {name: s.summary() for name, s in self.state.stats.items()},
            "wall_seconds": round(seconds, 2),
            "model_repository": None,
            "model_name": None,
            "model_version": None,
        }
        if not self.is_main:
            return summary
        self._write_report(classes)
        if config.export:
            repository = Path(config.repository or output / "model_repository")
            from trainer.export import export_checkpoint

            result = export_checkpoint(
                best_path,
                repository,
                model_name=config.model_name,
                input_format=config.input_format,
                precision=config.precision,
                data_dir=config.data,
            )
            summary |= {
                "model_repository": str(repository),
                "model_name": config.model_name,
                "model_version": result.version,
                "export_max_abs_diff": result.max_abs_diff,
            }
            log_event(log, "exported", repository=str(repository), version=result.version)
        write_summary(output / "summary.json", summary)
        log_event(log, "run_end", best_val_accuracy=self.state.best_val_accuracy, seconds=seconds)
        return summary

    def _write_report(self, classes: list[str]) -> None:
        try:
            from trainer.report import write_report
        except ImportError:
            log.warning("trainer.report is not installed: no report/ written")
            return
        confusion = np.asarray(
            self.state.best_confusion or np.zeros((len(classes), len(classes))), dtype=np.int64
        )
        write_report(
            self.run.output / "report", self.run.output / "metrics.jsonl", confusion, classes
        )
