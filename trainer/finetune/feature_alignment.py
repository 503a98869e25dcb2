"""Phase 2's feature alignment: MMD between labelled and unlabelled batches' pooled features.

Each training step also runs a batch of unlabelled target images (``--unlabeled-data``)
through the network and adds ``weight * mmd(source features, target features)`` to the loss,
where the features are the pooled ones the head reads (the input of the head module, as in
the head phase's feature cache). The weight ramps from 0 to ``max_weight`` over the phase
with DANN's schedule (``dann_ramp``). The labelled batch's features are captured by a forward
pre-hook on the head module while the step's own forward runs; the hook lives only during an
epoch.

BatchNorm layers in train mode (``--freeze-bn`` off, e.g. from scratch) normalise the
unlabelled batch with its own statistics, but their running statistics are not updated from
it: they stay the labelled data's, and re-estimating them on the target is AdaBN's separate,
checked decision (``trainer.stages.adaptation``).

What it costs: one more forward and backward per step, on a batch of the same size, and the
activations of both batches held at once. Under DDP the unlabelled batch runs through the
wrapped module without DDP's forward (the gradients of both batches reach each parameter
before DDP's reduction hook fires, once); every rank draws the same unlabelled batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from trainer.data.unlabeled import UnlabeledStream
from trainer.finetune.domain_adaptation import (
    MMD_BANDWIDTH_FACTORS,
    batchnorm_layers,
    dann_ramp,
    mmd,
)
from trainer.finetune.loop import StepSetup, autocast
from trainer.finetune.step_penalty import TermRecord
from trainer.model.classifier import head_module_name

METHOD = "mmd"


class FeatureAlignment:
    """The ``StepPenalty`` of the MMD alignment term (see the module docstring)."""

    def __init__(
        self, model: nn.Module, stream: UnlabeledStream, step: StepSetup, *, max_weight: float
    ) -> None:
        """
        Args:
            step: the steps the term joins: the target batch is prepared and computed on the
                same device and in the same precision as theirs.
        """
        self.head = model.get_submodule(head_module_name(model))
        self.norms = batchnorm_layers(model)
        self.stream = stream
        self.prepare = step.prepare
        self.device = step.device
        self.amp_dtype = step.amp_dtype
        self.max_weight = max_weight
        self.record = TermRecord()
        self.last_epoch: dict[str, Any] | None = None
        self._step = 0
        self._total = 1
        self._captured: torch.Tensor | None = None
        self._hook: RemovableHandle | None = None

    def weight_at(self, step: int) -> float:
        """The term's weight at step ``step`` of the phase: ``max_weight * dann_ramp(p)``."""
        return self.max_weight * dann_ramp(step / max(1, self._total))

    def begin_epoch(self, first_step: int, total_steps: int) -> None:
        self._step, self._total = first_step, max(1, total_steps)
        if self._hook is None:
            self._hook = self.head.register_forward_pre_hook(self._capture)

    def _capture(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self._captured = args[0]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        source = self._take_features()
        target_batch = self.prepare(self.stream.batch_at(self._step))
        runner = model.module if isinstance(model, DistributedDataParallel) else model
        # Momentum 0: a BatchNorm in train mode keeps its running statistics as they are.
        training = [layer for layer in self.norms if layer.training]
        momenta = [layer.momentum for layer in training]
        for layer in training:
            layer.momentum = 0.0
        try:
            with autocast(self.device, self.amp_dtype):
                runner(target_batch)
        finally:
            for layer, momentum in zip(training, momenta, strict=True):
                layer.momentum = momentum
        target = self._take_features()
        value = mmd(source.flatten(1).float(), target.flatten(1).float())
        weight = self.weight_at(self._step)
        self.record.add(value, weight)
        self._step += 1
        return value * weight

    def _take_features(self) -> torch.Tensor:
        features, self._captured = self._captured, None
        if features is None:
            raise RuntimeError(
                "feature alignment: the head module did not run in the step's forward pass"
            )
        return features

    def end_epoch(self) -> dict[str, Any]:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured = None
        self.last_epoch = {"method": METHOD, **self.record.summary()}
        return {"alignment": self.last_epoch}

    def facts(self) -> dict[str, Any]:
        """What the term is, for the summary and the checkpoint."""
        return {
            "method": METHOD,
            "features": "pooled (the head's input)",
            "max_weight": self.max_weight,
            "ramp": "max_weight * (2 / (1 + exp(-10 p)) - 1), p = share of phase 2's steps",
            "kernel": "RBF, bandwidths "
            + ", ".join(f"{f:g}" for f in MMD_BANDWIDTH_FACTORS)
            + " x the batch's mean squared distance",
            "batch_size": self.stream.batch_size,
        }
