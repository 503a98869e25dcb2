"""One epoch of training and one pass of evaluation, with explicit arguments: how a step
computes (``StepSetup``), what it updates (``WeightUpdate``) and how the pass is run
(``EpochControl``), never the whole config."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

from trainer.finetune.step_penalty import StepPenalty
from trainer.model.classifier import unwrap
from trainer.progress import progress

# Reading the loss back is a host-device sync; do it every few steps, not every step.
SYNC_EVERY = 10

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EpochResult:
    """What one (possibly interrupted) pass over the training batches did."""

    loss: float
    steps: int
    images: int
    seconds: float
    interrupted: bool
    # Each extra loss term's record over the epoch (``StepPenalty.end_epoch``).
    penalties: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalResult:
    """Validation loss, accuracy (0-1) and confusion matrix (rows: true class)."""

    loss: float
    accuracy: float
    confusion: np.ndarray
    count: int


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision context for ``dtype`` (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class StepSetup:
    """How one training step computes: where, input preparation, mixing, precision, loss."""

    device: torch.device
    prepare: Callable[[torch.Tensor], torch.Tensor]
    mixer: Mixer | None
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    # Phase 2's extra loss terms (feature alignment, forgetting guard), or None.
    penalty: StepPenalty | None = None

    def without_penalty(self) -> StepSetup:
        """The same step with the classification loss alone (the head phase, the trials)."""
        return self if self.penalty is None else dataclasses.replace(self, penalty=None)


@dataclass(frozen=True)
class WeightUpdate:
    """What each step's gradients update: the optimizer and its per-step schedule, with the
    gradients clipped to ``grad_clip`` (0: not clipped), then the EMA copy when one is kept."""

    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    grad_clip: float
    ema: AveragedModel | None = None


def _never() -> bool:
    return False


@dataclass(frozen=True)
class EpochControl:
    """How one pass over the batches is shown, stopped early and totalled.

    Attributes:
        total: how many batches the pass has (the progress bar's length).
        desc: the progress bar's label, e.g. ``"head 1/3"``.
        show_progress: True forces the bar, False hides it (ranks other than 0), None draws
            it only when stderr is a terminal.
        should_stop: asked after each step; True ends the pass there.
        on_step: given (step, loss) after each step; reading the loss is a host-device sync.
        distributed: the logged loss is the mean over every rank's images.
    """

    total: int
    desc: str
    show_progress: bool | None = None
    should_stop: Callable[[], bool] = _never
    on_step: Callable[[int, float], None] | None = None
    distributed: bool = False


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    step: StepSetup,
    update: WeightUpdate,
    control: EpochControl,
) -> EpochResult:
    """Train over ``batches`` (the model is already in train mode with frozen BN in eval).

    Stops early, after finishing the current step, when ``control.should_stop()`` turns
    true. ``step.penalty`` adds its term to each step's loss; the logged loss is the
    classification loss alone, the term's record is in the result.
    """
    device, penalty = step.device, step.penalty
    trainable = [p for group in update.optimizer.param_groups for p in group["params"]]
    loss_sum = torch.zeros((), device=device)
    steps = images = 0
    started = time.perf_counter()
    bar = progress(batches, total=control.total, desc=control.desc, enabled=control.show_progress)
    interrupted = False
    for raw_images, labels in bar:
        inputs = step.prepare(raw_images)
        targets = labels.to(device, non_blocking=True)
        if step.mixer is not None:
            inputs, targets = step.mixer(inputs, targets)
        with autocast(device, step.amp_dtype):
            logits = model(inputs)
            loss = step.loss_fn(logits.float(), targets)
        objective = loss if penalty is None else loss + penalty(model)
        _backward_and_step(objective, update, step.scaler, trainable)
        update.scheduler.step()
        if update.ema is not None:
            update.ema.update_parameters(unwrap(model))
        loss_sum += loss.detach() * len(labels)
        steps += 1
        images += len(labels)
        if steps % SYNC_EVERY == 0 or control.on_step is not None:
            current = float(loss.detach())
            bar.set_postfix(loss=current)
            if control.on_step is not None:
                control.on_step(steps, current)
        if control.should_stop():
            interrupted = True
            break
    bar.close()
    seconds = time.perf_counter() - started
    if control.distributed:
        # One collective per epoch: the logged loss is the mean over every rank's images.
        totals = torch.stack(
            [loss_sum.double(), torch.tensor(float(images), dtype=torch.float64, device=device)]
        )
        dist.all_reduce(totals)
        loss_sum, seen = totals[0], int(totals[1])
    else:
        seen = images
    mean_loss = float(loss_sum) / seen if seen else float("nan")
    penalties = penalty.end_epoch() if penalty is not None else {}
    return EpochResult(mean_loss, steps, images, seconds, interrupted, penalties)


def _backward_and_step(
    loss: torch.Tensor,
    update: WeightUpdate,
    scaler: torch.amp.GradScaler | None,
    trainable: list[torch.Tensor],
) -> None:
    """Backward pass, optional gradient clipping (on unscaled gradients), optimizer step."""
    optimizer, grad_clip = update.optimizer, update.grad_clip
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    step: StepSetup,
    *,
    num_classes: int,
    distributed: bool,
) -> EvalResult:
    """Loss, accuracy and confusion matrix over ``batches`` (summed over ranks with DDP),
    prepared and in the precision of ``step``."""
    # Left in eval mode: the caller re-applies train_mode (with frozen BN) before training.
    model.eval()
    device = step.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    for raw_images, labels in batches:
        if len(labels) == 0:
            continue
        targets = labels.to(device, non_blocking=True)
        with autocast(device, step.amp_dtype):
            logits = model(step.prepare(raw_images)).float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        predicted = logits.argmax(dim=1)
        confusion += torch.bincount(
            targets * num_classes + predicted, minlength=num_classes * num_classes
        )
    if distributed:
        dist.all_reduce(loss_sum)
        dist.all_reduce(confusion)
    matrix = confusion.view(num_classes, num_classes).cpu().numpy()
    count = int(matrix.sum())
    correct = int(np.trace(matrix))
    return EvalResult(
        loss=float(loss_sum) / count if count else float("nan"),
        accuracy=correct / count if count else 0.0,
        confusion=matrix,
        count=count,
    )
