"""How deep and how fast phase 2 goes, chosen from the data before it starts.

After the head is fitted on the frozen features, three settings are still open by default:

* ``--lr auto``: an LR range test (``trainer.finetune.lr_finder``) on the shallowest policy
  picks the top unfrozen group's learning rate.
* ``--unfreeze auto`` and ``--lr-decay auto``: a budgeted search over the candidate policies
  (``CANDIDATES``): the top group, the top two, every group with discriminative rates (the
  group d below the top at ``lr * 0.3**d``), and every group at the head's rate
  (``--head-lr``, flat: the "retrain everything" policy that wins when the source features
  transfer poorly). Each trains from the fitted head, warmup then cosine, and is undone
  afterwards.

The search is successive halving (Jamieson & Talwalkar, 2016; Hyperband's inner loop): every
candidate gets a short first rung; the best third (at least one) go on to a rung three times
as long, trained again from the head; the best of the last rung wins. Ranking is by val
accuracy, then the lower val loss, then the cheaper (shallower) policy. A policy that starts
slowly and wins later is still seen, where one short trial each would drop it. The probe
itself stays the floor: ``best.pt`` keeps the head phase's weights when no phase-2 epoch
beats them on val. When no trial beats the probe, phase 2 goes to the flat policy whatever
ranked first (``late_winner``): it is the one a short trial cannot judge.

What the search may cost: ``SEARCH_SHARE`` of the planned phase-2 steps for the rungs,
``RANGE_SHARE`` for the range test, each rung never shorter than ``MIN_RUNG_STEPS``; on a tiny
dataset (a few steps per epoch) that floor dominates, so the rungs that would take the trials
past phase 2's own planned steps are dropped (``affordable_rungs``): the best of the last rung
run wins. Every trial's cost is logged, and the
whole choice's seconds are in ``summary.json`` and ``report/strategies.md``.

A value the user gave is kept: ``--unfreeze`` skips the search (and ``--lr-decay`` keeps only
the candidates at that decay), ``--lr`` the range test. With ``--unlabeled-data`` (and the
alignment term on) the policy is ``all`` without a search: the alignment toward the unlabelled
images has to reach the low layers, where a shift of colour and texture lives, and the search
ranks on the labelled val split, which cannot see the target domain (measured in
``benchmarks/domain_shift.py``: the search's ``top:2`` kept 0.276 on the field images, ``all``
reached 0.336). When the head was not fitted on the cache (the streamed head phase), from
scratch, or without a phase 2, nothing is tested and the classic values (``top:1``, ``1e-4``,
decay 0.3) are used, logged.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from trainer import checkpoint as ckpt
from trainer.data.input_pipeline import Pipeline
from trainer.finetune.frozen_prefix import training_view
from trainer.finetune.loop import (
    EpochControl,
    EpochResult,
    StepSetup,
    WeightUpdate,
    train_one_epoch,
)
from trainer.finetune.lr_finder import FALLBACK_LR, LRFinding, suggest_lr, sweep_lrs
from trainer.finetune.phase_runner import TrainedModel, evaluate_on_val
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
FALLBACK_LR_DECAY = 0.3
FLAT = 1.0
RANGE_SHARE, SEARCH_SHARE = 0.05, 0.25
MIN_RANGE_STEPS, MAX_RANGE_STEPS = 16, 60
MIN_RUNG_STEPS, MAX_RUNG_STEPS = 8, 120
# Each rung is this many times as long as the one before; this share of a rung goes on.
RUNG_GROWTH, KEEP_SHARE = 3, 1 / 3
# Sampler epochs of the trials never collide with the phases' (trainer.finetune.phase_runner).
_TRIAL_EPOCH_BASE = 900_000


# Where a candidate's top learning rate comes from.
RANGE_TESTED = "range test"
HEAD_RATE = "head lr"


@dataclass(frozen=True)
class Candidate:
    """A phase-2 policy: which groups train, how their rates fall with depth, and where the
    top rate comes from."""

    policy: str
    lr_decay: float
    lr_rule: str = RANGE_TESTED

    @property
    def name(self) -> str:
        flat = self.policy != "top:1" and self.lr_decay == FLAT
        return f"{self.policy} flat" if flat else self.policy


# Shallow (cheap) to deep (dear): a tie goes to the earlier one. The flat policy retrains every
# group at the head's rate, the from-scratch recipe started from the source weights and the
# fitted head: the range test's gentle rate (a tenth of where the loss climbs, at most 1e-3)
# keeps pretrained features, which is the opposite of what this candidate is for.
CANDIDATES = (
    Candidate("top:1", FALLBACK_LR_DECAY),
    Candidate("top:2", FALLBACK_LR_DECAY),
    Candidate("all", FALLBACK_LR_DECAY),
    Candidate("all", FLAT, HEAD_RATE),
)


@dataclass(frozen=True)
class Trial:
    """One candidate trained from the fitted head for one rung, and how it did on val."""

    candidate: Candidate
    lr: float
    rung: int
    steps: int
    val_accuracy: float
    val_loss: float
    train_loss: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.candidate.policy,
            "lr_decay": self.candidate.lr_decay,
            "name": self.candidate.name,
            "lr": self.lr,
            "rung": self.rung,
            "steps": self.steps,
            "val_accuracy": round(self.val_accuracy, 4),
            "val_loss": round(self.val_loss, 4),
            "train_loss": round(self.train_loss, 4),
            "seconds": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class FinetuneChoice:
    """Phase 2's policy, rates, where each came from, and the evidence."""

    unfreeze: str
    lr: float
    unfreeze_source: str
    lr_source: str
    lr_decay: float = FALLBACK_LR_DECAY
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
            "lr_decay": self.lr_decay,
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


def untested(config: Any, reason: str, source: str | None = None) -> FinetuneChoice:
    """The user's values (or ``source``'s), the classic ones where unset; nothing trained."""
    return FinetuneChoice(
        unfreeze=config.unfreeze or FALLBACK_POLICY,
        lr=config.lr if config.lr is not None else FALLBACK_LR,
        unfreeze_source=source or ("flag" if config.unfreeze else "fallback"),
        lr_source=source or ("flag" if config.lr is not None else "fallback"),
        lr_decay=config.lr_decay if config.lr_decay is not None else FALLBACK_LR_DECAY,
        reason=reason,
    )


def choose_finetune(
    context: RunContext,
    trained: TrainedModel,
    pipeline: Pipeline,
    step: StepSetup,
    probe_accuracy: float | None = None,
) -> FinetuneChoice:
    """Test what is unset (the LR, then the policy) from the fitted head; the model and the
    RNGs are as they were when this returns.

    Args:
        probe_accuracy: the fitted head's val accuracy; when no trial beats it, phase 2 goes
            to the late-winning flat policy (``late_winner``).
    """
    config = context.config
    started = time.perf_counter()
    planned = config.finetune_epochs * pipeline.steps_per_epoch
    bench = _TrialBench(context, trained, pipeline, step)
    adapting = (
        config.unlabeled_data is not None and config.alignment_weight > 0 and not config.unfreeze
    )
    candidates = (
        [Candidate("all", config.lr_decay or FALLBACK_LR_DECAY)]
        if adapting
        else _candidates(trained, config.unfreeze, config.lr_decay)
    )
    finding = None
    tested = config.lr
    if tested is None and any(c.lr_rule == RANGE_TESTED for c in candidates):
        steps = _clamp(RANGE_SHARE * planned, MIN_RANGE_STEPS, MAX_RANGE_STEPS)
        finding = bench.range_test(candidates[0], steps)
        tested = finding.suggestion
        log_event(log, "lr_range_test", suggestion=tested, steps=steps, reason=finding.reason)

    def lr_of(candidate: Candidate) -> tuple[float, str]:
        if config.lr is not None:
            return config.lr, "flag"
        if candidate.lr_rule == HEAD_RATE or tested is None:
            return config.head_lr, HEAD_RATE
        return tested, RANGE_TESTED

    trials: list[Trial] = []
    chosen, source, reason = candidates[0], "flag" if config.unfreeze else "only candidate", ""
    if adapting:
        source = "--unlabeled-data"
        reason = "the alignment toward the unlabelled images must reach every layer"
    elif len(candidates) > 1:
        rungs = _search_rungs(len(candidates), planned, bench.steps_spent)
        chosen, trials = successive_halving(
            candidates, rungs, lambda c, rung, steps: bench.trial(c, lr_of(c)[0], rung, steps)
        )
        source = "search"
        chosen, reason = _winner_or_late(chosen, candidates, trials, probe_accuracy)
    lr, lr_source = lr_of(chosen)
    choice = FinetuneChoice(
        unfreeze=chosen.policy,
        lr=lr,
        unfreeze_source=source,
        lr_source=lr_source,
        lr_decay=chosen.lr_decay,
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
        unfreeze=f"{chosen.name} ({source})",
        lr=f"{lr:.2e} ({lr_source})",
        seconds=round(choice.seconds, 1),
        share_of_phase2_steps=round(bench.steps_spent / planned, 3) if planned else None,
        reason=reason,
    )
    return choice


def successive_halving(
    candidates: Sequence[Candidate],
    rungs: Sequence[int],
    run: Callable[[Candidate, int, int], Trial],
) -> tuple[Candidate, list[Trial]]:
    """The winner of ``rungs`` (steps per rung, growing) and every trial on the way.

    ``run(candidate, rung, steps)`` trains a candidate from the same start for ``steps``
    steps and scores it. After each rung but the last, the best ``KEEP_SHARE`` (at least one)
    go on; a single survivor wins without another rung.
    """
    alive = list(candidates)
    trials: list[Trial] = []
    for rung, steps in enumerate(rungs):
        scored = [run(candidate, rung, steps) for candidate in alive]
        trials.extend(scored)
        keep = 1 if rung == len(rungs) - 1 else max(1, math.ceil(len(alive) * KEEP_SHARE))
        ranked = sorted(range(len(scored)), key=lambda i: (_rank_key(scored[i]), -i), reverse=True)
        alive = [alive[i] for i in sorted(ranked[:keep])]
        if len(alive) == 1:
            break
    return alive[0], trials


def late_winner(
    candidates: Sequence[Candidate], trials: Sequence[Trial], probe_accuracy: float | None
) -> Candidate | None:
    """The flat policy when no trial beat the probe, else None.

    A trial that beats the probe says a policy improves on it quickly; when none does, the
    trials have shown that the policies they can judge add nothing, and phase 2's steps are
    better spent on the one they cannot: every layer at the head's rate wrecks the probe in
    its first steps and overtakes it after epochs (``benchmarks/domain_shift.py``'s retrain:
    0.17 val after an 8-step trial, 0.92 after 8 epochs against the probe's 0.855). The
    probe stays the floor either way, so the switch costs nothing but the chance of a small
    gain from a shallow policy that no trial showed.
    """
    flat = [c for c in candidates if c.lr_rule == HEAD_RATE]
    if probe_accuracy is None or not flat or not trials:
        return None
    # Four places: the probe's and the trials' accuracies come from different float paths.
    if any(round(t.val_accuracy, 4) > round(probe_accuracy, 4) for t in trials):
        return None
    return flat[0]


def _winner_or_late(
    winner: Candidate,
    candidates: Sequence[Candidate],
    trials: Sequence[Trial],
    probe_accuracy: float | None,
) -> tuple[Candidate, str]:
    """The search's winner, or the late winner when no trial beat the probe; and why."""
    late = late_winner(candidates, trials, probe_accuracy)
    if late is None or late == winner:
        return winner, _reason(winner, trials)
    return late, (
        f"{late.name}: no trial beat the probe's val accuracy ({probe_accuracy:.3f}; best "
        f"{max(t.val_accuracy for t in trials):.3f}), so phase 2 goes to the policy a short "
        "trial cannot judge: retraining every layer fast overtakes a probe only after epochs "
        "(best.pt keeps the probe unless an epoch beats it)"
    )


def _search_rungs(candidates: int, planned: int, spent: int) -> list[int]:
    """Each rung's steps: ``SEARCH_SHARE`` of phase 2's ``planned`` steps over the rungs, the
    first within the rung bounds, as many rungs as phase 2 affords after ``spent``."""
    first = _clamp(SEARCH_SHARE * planned / _rung_units(candidates), MIN_RUNG_STEPS, MAX_RUNG_STEPS)
    rungs = [first * RUNG_GROWTH**i for i in range(_rung_count(candidates))]
    return affordable_rungs(rungs, candidates, planned - spent)


def affordable_rungs(rungs: Sequence[int], candidates: int, budget: int) -> list[int]:
    """The rungs whose trials, added up, stay within ``budget`` steps (the first always).

    On small data the rungs' floor (``MIN_RUNG_STEPS``) makes the search dearer than phase 2
    itself (the demo's target task: 80 trial steps for 40 planned), and the whole default run
    is to cost at most 1.5x a from-scratch run; so the search never trains more steps than
    phase 2 has left after the range test, and drops the later rungs that would exceed it.
    """
    kept: list[int] = []
    spent, alive = 0, candidates
    for steps in rungs:
        spent += alive * steps
        if kept and spent > budget:
            break
        kept.append(steps)
        alive = max(1, math.ceil(alive * KEEP_SHARE))
    return kept


def _rank_key(trial: Trial) -> tuple[float, float]:
    return (trial.val_accuracy, -trial.val_loss)


def _rung_count(candidates: int) -> int:
    """Rungs until one survivor is left."""
    count, alive = 1, candidates
    while alive > 1:
        alive = max(1, math.ceil(alive * KEEP_SHARE))
        count += 1 if alive > 1 else 0
    return count


def _rung_units(candidates: int) -> int:
    """The search's steps in units of the first rung's length."""
    units, alive = 0, candidates
    for rung in range(_rung_count(candidates)):
        units += alive * RUNG_GROWTH**rung
        alive = max(1, math.ceil(alive * KEEP_SHARE))
    return units


def _reason(chosen: Candidate, trials: Sequence[Trial]) -> str:
    last = max(t.rung for t in trials)
    finals = ", ".join(
        f"{t.candidate.name} {t.val_accuracy:.3f}/{t.val_loss:.3f}"
        for t in trials
        if t.rung == last
    )
    return (
        f"{chosen.name}: best val accuracy/loss after rung {last + 1} of successive halving "
        f"({finals})"
    )


def _candidates(trained: TrainedModel, policy: str, lr_decay: float | None) -> list[Candidate]:
    """The candidates this model has groups for (shallow to deep), within what was given."""
    if policy:
        return [Candidate(policy, lr_decay if lr_decay is not None else FALLBACK_LR_DECAY)]
    body = [g for g in trained.groups if g.name != HEAD]
    fits = [c for c in CANDIDATES if c.policy == "all" or int(c.policy.split(":")[1]) < len(body)]
    if lr_decay is None:
        return fits
    return list(dict.fromkeys(Candidate(c.policy, lr_decay) for c in fits))


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

    def range_test(self, candidate: Candidate, steps: int) -> LRFinding:
        """Train ``steps`` steps of ``candidate`` with the body's LR swept and the head held still:
        with the head learning too, an early fall of the loss is the head's, not the body's."""
        lrs = sweep_lrs(steps)
        losses: list[float] = []
        with self._undone():
            optimizer = self._optimizer(candidate, lr=1.0)
            factors = [
                (lambda i: 0.0) if group["group"] == HEAD else (lambda i: lrs[min(i, steps - 1)])
                for group in optimizer.param_groups
            ]
            self._train(optimizer, LambdaLR(optimizer, factors), steps, losses.append)
        return suggest_lr(lrs, self._mean_over_ranks(losses))

    def trial(self, candidate: Candidate, lr: float, rung: int, steps: int) -> Trial:
        """Train ``candidate`` at ``lr`` for ``steps`` steps (warmup + cosine) from the fitted
        head and evaluate."""
        started = time.perf_counter()
        with self._undone():
            optimizer = self._optimizer(candidate, lr=lr)
            schedule = warmup_cosine(steps, self.context.config.warmup_fraction)
            trained = self._train(optimizer, LambdaLR(optimizer, schedule), steps, None)
            scored = evaluate_on_val(self.trained.module, self.pipeline, self.step, self.context)
        trial = Trial(
            candidate,
            lr,
            rung,
            steps,
            scored.accuracy,
            scored.loss,
            trained.loss,
            time.perf_counter() - started,
        )
        log_event(log, "finetune_trial", **trial.to_dict())
        return trial

    # ---- the parts ---------------------------------------------------------------------

    def _optimizer(self, candidate: Candidate, *, lr: float) -> torch.optim.Optimizer:
        """The candidate's trainable groups and per-group LRs (the phase it would run)."""
        config = self.context.config
        (phase,) = build_phases(
            [g.name for g in self.trained.groups],
            head_epochs=0,
            finetune_epochs=1,
            policy=candidate.policy,
            lr=lr,
            head_lr=config.head_lr,
            lr_decay=candidate.lr_decay,
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
    ) -> EpochResult:
        config = self.context.config
        # The phase's own fast path: the frozen prefix folded, without autograd.
        view = training_view(
            self.trained.module,
            config.arch,
            self.trained.groups,
            channels_last=bool(config.channels_last),
        )
        result = train_one_epoch(
            view,
            itertools.islice(self._batches(), steps),
            self.step.without_penalty(),
            WeightUpdate(optimizer, scheduler, config.grad_clip),
            EpochControl(
                total=steps,
                desc="finetune choice",
                show_progress=False,
                on_step=(lambda _, loss: on_loss(loss)) if on_loss is not None else None,
            ),
        )
        self.steps_spent += steps
        return result

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
