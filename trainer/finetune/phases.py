"""Training phases as data, and what a phase does to the model and the optimizer.

Phase 1 (``head``) trains the new head on a frozen backbone; phase 2 (``finetune``) unfreezes
layer groups from the top with discriminative learning rates (the group at depth d below the
top unfrozen one gets ``lr * lr_decay**d``). Frozen groups have ``requires_grad=False`` and their
BatchNorm layers stay in eval mode (``train_mode`` re-applies that after every
``model.train()``), so their running statistics never move. Because no frozen parameter needs a
gradient and the input does not either, autograd records nothing for the frozen backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from trainer.errors import ConfigError
from trainer.model.layer_groups import HEAD, LayerGroup, group_modules

HEAD_PHASE = "head"
FINETUNE_PHASE = "finetune"


@dataclass(frozen=True)
class Phase:
    """One phase: which groups train (from which epoch), for how long, at which LRs."""

    name: str
    trainable_groups: tuple[str, ...]
    epochs: int
    lrs: dict[str, float] = field(hash=False)
    unfreeze_every: int = 0
    unfreeze_queue: tuple[str, ...] = ()
    freeze_bn: bool = False

    def groups_at(self, epoch: int) -> tuple[str, ...]:
        """Trainable groups in 1-based ``epoch`` (gradual unfreezing adds one every N)."""
        if not self.unfreeze_every:
            return self.trainable_groups
        extra = min(len(self.unfreeze_queue), (epoch - 1) // self.unfreeze_every)
        return self.trainable_groups + self.unfreeze_queue[:extra]


def build_phases(  # noqa: PLR0913  keyword-only phase settings, each a config field
    group_names: list[str],
    *,
    head_epochs: int,
    finetune_epochs: int,
    policy: str,
    lr: float,
    head_lr: float,
    lr_decay: float,
    freeze_bn: bool,
) -> list[Phase]:
    """The phases of a run. ``group_names`` is ordered stem -> head (``layer_groups``).

    ``policy``: ``top:K`` (top K body groups), ``all``, or ``gradual:N`` (start with the top
    group, one more every N epochs, top-down).
    """
    body_top_down = [g for g in reversed(group_names) if g != HEAD]
    phases = []
    if head_epochs > 0:
        phases.append(Phase(HEAD_PHASE, (HEAD,), head_epochs, {HEAD: head_lr}))
    if finetune_epochs > 0:
        lrs = {HEAD: head_lr} | {g: lr * lr_decay**d for d, g in enumerate(body_top_down)}
        kind, _, count = policy.partition(":")
        if policy == "all":
            phases.append(
                Phase(
                    FINETUNE_PHASE,
                    (HEAD, *body_top_down),
                    finetune_epochs,
                    lrs,
                    freeze_bn=freeze_bn,
                )
            )
        elif kind == "top":
            k = int(count)
            if k > len(body_top_down):
                raise ConfigError(
                    f"unfreeze: top:{k} but the model has {len(body_top_down)} layer groups "
                    f"below the head ({', '.join(reversed(body_top_down))})"
                )
            groups = (HEAD, *body_top_down[:k])
            phases.append(
                Phase(
                    FINETUNE_PHASE,
                    groups,
                    finetune_epochs,
                    {g: lrs[g] for g in groups},
                    freeze_bn=freeze_bn,
                )
            )
        elif kind == "gradual":
            phases.append(
                Phase(
                    FINETUNE_PHASE,
                    (HEAD, body_top_down[0]),
                    finetune_epochs,
                    lrs,
                    unfreeze_every=int(count),
                    unfreeze_queue=tuple(body_top_down[1:]),
                    freeze_bn=freeze_bn,
                )
            )
        else:
            raise ConfigError(f"unfreeze: unknown policy {policy!r}")
    return phases


def set_trainable(model: nn.Module, groups: list[LayerGroup], trainable: tuple[str, ...]) -> None:
    """``requires_grad`` on exactly the parameters of the ``trainable`` groups."""
    owner = {name: g.name for g in groups for name, _ in model.named_parameters() if g.owns(name)}
    for name, param in model.named_parameters():
        param.requires_grad_(owner[name] in trainable)


def train_mode(
    model: nn.Module, groups: list[LayerGroup], trainable: tuple[str, ...], freeze_bn: bool
) -> None:
    """``model.train()``, then BatchNorm back to eval in frozen groups (all of them with
    ``freeze_bn``) so their running statistics stay fixed."""
    model.train()
    for group in groups:
        if group.name in trainable and not freeze_bn:
            continue
        for module in group_modules(model, group):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def build_optimizer(
    model: nn.Module,
    groups: list[LayerGroup],
    trainable: tuple[str, ...],
    lrs: dict[str, float],
    weight_decay: float,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: per layer group, one param group with weight
    decay and one without (norm weights and biases, i.e. every tensor with ndim <= 1)."""
    param_groups = []
    for group in groups:
        if group.name not in trainable:
            continue
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in model.named_parameters():
            if group.owns(name) and param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                param_groups.append(
                    {
                        "params": params,
                        "lr": lrs[group.name],
                        "weight_decay": wd,
                        "group": group.name,
                    }
                )
    if not param_groups:
        raise RuntimeError("no trainable parameters in this phase")
    # The fused kernel updates all tensors of a group at once (CPU and CUDA); the default
    # per-tensor loop on CPU costs about as much as the forward pass of a small model.
    return torch.optim.AdamW(param_groups, lr=lrs[trainable[0]], fused=True)


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Keep the moment estimates of parameters that stay trainable (gradual unfreezing)."""
    for group in new.param_groups:
        for param in group["params"]:
            if param in old.state:
                new.state[param] = old.state[param]


def warmup_cosine(total_steps: int, warmup_fraction: float):
    """LR factor per step: linear warmup, then cosine decay to 1% of the base LR."""
    warmup = round(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float, start_step: int = 0
) -> LambdaLR:
    """Warmup + cosine over the phase's ``total_steps``, positioned at ``start_step``."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_fraction), last_epoch=start_step - 1
    )


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR of each layer group (``lr/<group>``), for metrics."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        rates.setdefault(f"lr/{group['group']}", float(group["lr"]))
    return rates
