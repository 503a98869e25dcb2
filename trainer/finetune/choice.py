"""How deep and how fast phase 2 goes, chosen from the data before it starts.

After the head is fitted on the frozen features, two settings are still open by default:

* ``--lr auto``: an LR range test (``trainer.finetune.lr_finder``) on the shallowest policy
  picks the top unfrozen group's learning rate.
* ``--unfreeze auto``: short trials of the candidate policies (``CANDIDATES``: the top group,
  the top two, every group with discriminative rates) at that rate, each from the fitted head
  and restored afterwards; the policy with the best val accuracy (then the lower val loss; the
  shallower one on a tie) is what phase 2 runs. Features that already separate the classes
  well favour a shallow policy; features that transfer poorly need the deeper ones, and the
  trials show which from the data rather than from a rule.

What the choice may cost: ``RANGE_SHARE`` + ``TRIAL_SHARE`` of the planned phase-2 steps
(15%), but never fewer than ``MIN_RANGE_STEPS`` + ``MIN_TRIAL_STEPS`` per candidate, so on a
tiny dataset (a few steps per epoch) the floor dominates. Each trial's cost is logged, and the
whole choice's seconds are in ``summary.json``.

A value the user gave is kept: ``--unfreeze`` skips the trials, ``--lr`` the range test. When
the head was not fitted on the cache (the streamed head phase), from scratch, or without a
phase 2, nothing is tested and the classic values (``top:1``, ``1e-4``) are used, logged.

Under DDP every rank runs the same test and trials on its shard of the training batches; the
range test's losses and the trials' val confusions are summed over the ranks, so each rank
reaches the same decision without a broadcast.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from trainer import checkpoint as ckpt
from trainer.data.input_pipeline import Pipeline
from trainer.finetune.frozen_prefix import training_view
from trainer.finetune.loop import train_one_epoch
from trainer.finetune.lr_finder import FALLBACK_LR, LRFinding, suggest_lr, sweep_lrs
from trainer.finetune.phase_runner import StepSetup, TrainedModel, evaluate_on_val
from trainer.finetune.phases import (
    build_optimizer,
    build_phases,
    set_trainable,
    train_mode,
    warmup_cosine,
)
from trainer.job.context import RunContext
from trainer.model.layer_groups import HEAD
from trainer.progress import log_event

log = logging.getLogger(__name__)

FALLBACK_POLICY = "top:1"
CANDIDATES = ("top:1", "top:2", "all")
RANGE_SHARE, TRIAL_SHARE = 0.05, 0.10
MIN_RANGE_STEPS, MAX_RANGE_STEPS = 16, 60
MIN_TRIAL_STEPS, MAX_TRIAL_STEPS = 8, 120
# Sampler epochs of the trials never collide with the phases' (trainer.finetune.phase_runner).
_TRIAL_EPOCH_BASE = 900_000


@dataclass(frozen=True)
class Trial:
    """One candidate policy trained briefly from the fitted head, and how it did on val."""

    policy: str
    lr: float
    steps: int
    val_accuracy: float
    val_loss: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "lr": self.lr,
            "steps": self.steps,
            "val_accuracy": round(self.val_accuracy, 4),
            "val_loss": round(self.val_loss, 4),
            "seconds": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class FinetuneChoice:
    """Phase 2's policy and top LR, where each came from, and the evidence."""

    unfreeze: str
    lr: float
    unfreeze_source: str
    lr_source: str
    reason: str = ""
    lr_finding: LRFinding | None = None
    trials: tuple[Trial, ...] = ()
    seconds: float = 0.0
    planned_steps: int = 0
    spent_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """For ``summary.json`` (the LR curve itself goes to ``report/lr_find.json``)."""
        return {
            "unfreeze": self.unfreeze,
            "unfreeze_source": self.unfreeze_source,
            "lr": self.lr,
            "lr_source": self.lr_source,
            "reason": self.reason,
            "lr_range_test": (
                {"suggestion": self.lr_finding.suggestion, "reason": self.lr_finding.reason}
                if self.lr_finding is not None
                else None
            ),
            "trials": [t.to_dict() for t in self.trials],
            "seconds": round(self.seconds, 2),
            "planned_phase2_steps": self.planned_steps,
            "steps_spent": self.spent_steps,
        }


def untested(config: Any, reason: str) -> FinetuneChoice:
    """The user's values, the classic ones where unset; nothing trained."""
    return FinetuneChoice(
        unfreeze=config.unfreeze or FALLBACK_POLICY,
        lr=config.lr if config.lr is not None else FALLBACK_LR,
        unfreeze_source="flag" if config.unfreeze else "fallback",
        lr_source="flag" if config.lr is not None else "fallback",
        reason=reason,
    )


def choose_finetune(
    context: RunContext, trained: TrainedModel, pipeline: Pipeline, step: StepSetup
) -> FinetuneChoice:
    """Test what is unset (the LR, then the policy) from the fitted head; the model and the
    RNGs are as they were when this returns."""
    config = context.config
    started = time.perf_counter()
    planned = config.finetune_epochs * pipeline.steps_per_epoch
    bench = _TrialBench(context, trained, pipeline, step)
    candidates = [config.unfreeze] if config.unfreeze else _candidates(trained)
    finding = None
    lr, lr_source = config.lr, "flag"
    if lr is None:
        steps = _clamp(RANGE_SHARE * planned, MIN_RANGE_STEPS, MAX_RANGE_STEPS)
        finding = bench.range_test(candidates[0], steps)
        lr, lr_source = finding.suggestion, "range test"
        log_event(log, "lr_range_test", suggestion=lr, steps=steps, reason=finding.reason)
    trials: list[Trial] = []
    policy, policy_source, reason = candidates[0], "flag", ""
    if not config.unfreeze:
        steps = _clamp(TRIAL_SHARE * planned / len(candidates), MIN_TRIAL_STEPS, MAX_TRIAL_STEPS)
        trials = [bench.trial(candidate, lr, steps) for candidate in candidates]
        best = max(trials, key=lambda t: (t.val_accuracy, -t.val_loss))
        policy, policy_source = best.policy, "trials"
        reason = f"best val accuracy after {steps} steps of each: " + ", ".join(
            f"{t.policy} {t.val_accuracy:.3f}" for t in trials
        )
    choice = FinetuneChoice(
        unfreeze=policy,
        lr=lr,
        unfreeze_source=policy_source,
        lr_source=lr_source,
        reason=reason,
        lr_finding=finding,
        trials=tuple(trials),
        seconds=time.perf_counter() - started,
        planned_steps=planned,
        spent_steps=bench.steps_spent,
    )
    log_event(
        log,
        "finetune_choice",
        unfreeze=f"{policy} ({policy_source})",
        lr=f"{lr:.2e} ({lr_source})",
        seconds=round(choice.seconds, 1),
        share_of_phase2_steps=round(bench.steps_spent / planned, 3) if planned else None,
        reason=reason,
    )
    return choice


def _candidates(trained: TrainedModel) -> list[str]:
    """The candidate policies this model has groups for (shallow to deep)."""
    body = [g for g in trained.groups if g.name != HEAD]
    return [c for c in CANDIDATES if c == "all" or int(c.split(":")[1]) < len(body)]


def _clamp(value: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(value))))


class _TrialBench:
    """Short training runs from the model's current weights, each undone afterwards."""

    def __init__(
        self, context: RunContext, trained: TrainedModel, pipeline: Pipeline, step: StepSetup
    ) -> None:
        self.context = context
        self.trained = trained
        self.pipeline = pipeline
        self.step = step
        self.steps_spent = 0
        self._epochs = itertools.count(_TRIAL_EPOCH_BASE)

    def range_test(self, policy: str, steps: int) -> LRFinding:
        """Train ``steps`` steps of ``policy`` with the body's LR swept and the head held still:
        with the head learning too, an early fall of the loss is the head's, not the body's."""
        lrs = sweep_lrs(steps)
        losses: list[float] = []
        with self._undone():
            optimizer = self._optimizer(policy, lr=1.0)
            factors = [
                (lambda i: 0.0) if group["group"] == HEAD else (lambda i: lrs[min(i, steps - 1)])
                for group in optimizer.param_groups
            ]
            self._train(optimizer, LambdaLR(optimizer, factors), steps, losses.append)
        return suggest_lr(lrs, self._mean_over_ranks(losses))

    def trial(self, policy: str, lr: float, steps: int) -> Trial:
        """Train ``policy`` at ``lr`` for ``steps`` steps (warmup + cosine) and evaluate."""
        started = time.perf_counter()
        with self._undone():
            optimizer = self._optimizer(policy, lr=lr)
            schedule = warmup_cosine(steps, self.context.config.warmup_fraction)
            self._train(optimizer, LambdaLR(optimizer, schedule), steps, None)
            scored = evaluate_on_val(self.trained.module, self.pipeline, self.step, self.context)
        trial = Trial(
            policy, lr, steps, scored.accuracy, scored.loss, time.perf_counter() - started
        )
        log_event(log, "finetune_trial", **trial.to_dict())
        return trial

    # ---- the parts ---------------------------------------------------------------------

    def _optimizer(self, policy: str, *, lr: float) -> torch.optim.Optimizer:
        """The policy's trainable groups and per-group LRs (the phase it would run)."""
        config = self.context.config
        assert config.lr_decay is not None
        (phase,) = build_phases(
            [g.name for g in self.trained.groups],
            head_epochs=0,
            finetune_epochs=1,
            policy=policy,
            lr=lr,
            head_lr=config.head_lr,
            lr_decay=config.lr_decay,
            freeze_bn=bool(config.freeze_bn),
        )
        trainable = phase.groups_at(1)
        module, groups = self.trained.module, self.trained.groups
        set_trainable(module, groups, trainable)
        train_mode(module, groups, trainable, phase.freeze_bn)
        return build_optimizer(module, groups, trainable, phase.lrs, config.weight_decay)

    def _train(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
        steps: int,
        on_loss: Callable[[float], None] | None,
    ) -> None:
        config = self.context.config
        # The phase's own fast path: the frozen prefix folded, without autograd.
        view = training_view(
            self.trained.module,
            config.arch,
            self.trained.groups,
            channels_last=bool(config.channels_last),
        )
        train_one_epoch(
            view,
            itertools.islice(self._batches(), steps),
            optimizer=optimizer,
            scheduler=scheduler,
            prepare=self.step.prepare,
            loss_fn=self.step.loss_fn,
            device=self.context.device,
            amp_dtype=self.step.amp_dtype,
            scaler=self.step.scaler,
            grad_clip=config.grad_clip,
            mixer=self.step.mixer,
            ema=None,
            total=steps,
            desc="finetune choice",
            show_progress=False,
            should_stop=lambda: False,
            on_step=(lambda _, loss: on_loss(loss)) if on_loss is not None else None,
        )
        self.steps_spent += steps

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches for as many steps as asked, epoch after epoch."""
        sampler = self.pipeline.sampler
        while True:
            sampler.set_epoch(next(self._epochs))
            sampler.set_start(0)
            yield from self.pipeline.train_loader

    def _mean_over_ranks(self, losses: list[float]) -> list[float]:
        if not self.context.dist.enabled:
            return losses
        values = torch.tensor(
            [loss if math.isfinite(loss) else 1e30 for loss in losses],
            dtype=torch.float64,
            device=self.context.device,
        )
        dist.all_reduce(values)
        values /= self.context.dist.world_size
        return [float(v) if v < 1e29 else math.inf for v in values]

    def _undone(self) -> _Undo:
        return _Undo(self.trained.module)


class _Undo:
    """Puts back the weights, the BatchNorm statistics, ``requires_grad`` and every RNG."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.state = copy.deepcopy(self.module.state_dict())
        self.grads = {n: p.requires_grad for n, p in self.module.named_parameters()}
        self.rng = ckpt.rng_state()

    def __exit__(self, *exc: object) -> None:
        self.module.load_state_dict(self.state)
        for name, param in self.module.named_parameters():
            param.requires_grad_(self.grads[name])
            param.grad = None
        ckpt.restore_rng_state(self.rng)
