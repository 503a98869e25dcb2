"""Building blocks of domain adaptation without target labels: losses, a layer, AdaBN.

The target domain is where the model is used (the server's captured images); its images come
without labels. Three ways to close a source -> target gap with them:

- **Feature alignment** (``mmd``): the squared maximum mean discrepancy between the pooled
  features of a labelled and an unlabelled batch, with a sum of RBF kernels over several
  bandwidths (Long et al. 2015, DAN). Added to the training loss, it pulls the two feature
  distributions together; its weight ramps up with ``dann_ramp`` (Ganin & Lempitsky 2015).
- **Adversarial alignment** (``GradientReversal``): identity forward, negated and scaled
  gradient backward, between the features and a domain classifier (DANN). Provided and tested
  as a block; the trainer wires MMD, which needs no extra network.
- **AdaBN** (``adapt_batchnorm``, Li et al. 2016): every BatchNorm layer's running statistics
  re-estimated on target images; nothing else changes.

``prediction_entropy`` is a label-free signal on target images: the mean entropy of the
predicted class distribution (lower: more confident), logged before and after adaptation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Multipliers of the base bandwidth (the mean pairwise squared distance of the joint batch):
# DAN's geometric family, one factor of 2 apart, wide enough that some kernel sees structure
# whatever the scale of the features.
MMD_BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


class GradientReversalFunction(torch.autograd.Function):
    """Identity in the forward pass; the gradient times ``-scale`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return features.view_as(features)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad_output, None


def reverse_gradient(features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``features`` unchanged; their gradient negated and multiplied by ``scale``."""
    result: torch.Tensor = GradientReversalFunction.apply(features, scale)  # type: ignore[no-untyped-call]
    return result


class GradientReversal(nn.Module):
    """DANN's gradient-reversal layer: the feature extractor before it learns to *confuse*
    the domain classifier after it. ``scale`` (lambda) is usually ramped with ``dann_ramp``."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return reverse_gradient(features, self.scale)


def dann_ramp(progress: float) -> float:
    """DANN's weight schedule ``2 / (1 + exp(-10 p)) - 1``: 0 at the start of training, 0.99
    at ``p = 0.5``; ``progress`` is the share of the training steps done (clamped to 0-1).

    Early features are noise to align; the ramp lets the supervised loss shape them first.
    """
    p = min(1.0, max(0.0, progress))
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


def mmd(
    source: torch.Tensor,
    target: torch.Tensor,
    bandwidth_factors: tuple[float, ...] = MMD_BANDWIDTH_FACTORS,
) -> torch.Tensor:
    """Squared MMD between two batches of feature vectors with a multi-bandwidth RBF kernel.

    The kernel is the mean of ``exp(-||x - y||^2 / (b * f))`` over ``bandwidth_factors`` f,
    with b the mean squared distance between the distinct rows of both batches (held
    constant for the gradient). The estimate is the biased V-statistic ``mean K(s, s') +
    mean K(t, t') - 2 mean K(s, t)``: exactly zero for identical batches, never negative,
    and between 0 and 2, on the scale of a classification loss.

    Args:
        source: ``[n, d]`` features (e.g. of labelled images).
        target: ``[m, d]`` features (e.g. of unlabelled images).
    """
    if source.dim() != 2 or target.dim() != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(
            f"mmd takes two [n, d] batches of one width, got {tuple(source.shape)} and "
            f"{tuple(target.shape)}"
        )
    rows = torch.cat([source, target]).float()
    squares = rows.pow(2).sum(dim=1)
    # ||x||^2 + ||y||^2 - 2 x.y: differentiable everywhere (cdist's sqrt is not at 0).
    distances = (squares[:, None] + squares[None, :] - 2.0 * rows @ rows.T).clamp_min(0.0)
    count = len(rows)
    base = distances.detach().sum() / max(1, count * count - count)
    base = base.clamp_min(torch.finfo(base.dtype).tiny)
    kernel = torch.stack([torch.exp(-distances / (base * f)) for f in bandwidth_factors]).mean(0)
    n = len(source)
    within_source = kernel[:n, :n].mean()
    within_target = kernel[n:, n:].mean()
    across = kernel[:n, n:].mean()
    return (within_source + within_target - 2.0 * across).clamp_min(0.0)


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """AdaBN: re-estimate every BatchNorm layer's running statistics on ``batches``.

    The statistics are reset and then accumulated as a cumulative average over the batches
    (``momentum=None``), with the BatchNorm layers alone in train mode: dropout and every
    other layer stay in eval mode, so the statistics are those of the deployed network's
    activations. No gradient is computed; parameters and every other buffer are untouched
    (tested bit for bit). The modes and momenta are put back afterwards.

    Args:
        model: the network, changed in place.
        batches: target images (unlabelled), as ``prepare`` takes them.
        prepare: turns a batch into the model's input (e.g. normalises it on the device).

    Returns:
        The number of images the statistics were estimated on (0: the model has no
        BatchNorm layer or ``batches`` was empty; then nothing changed).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = [layer.momentum for layer in layers]
    saved = [
        (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())  # type: ignore[union-attr]
        for layer in layers
    ]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    images = 0
    try:
        for batch in batches:
            if len(batch) == 0:
                continue
            model(prepare(batch) if prepare is not None else batch)
            images += len(batch)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        for module, mode in modes.items():
            module.training = mode
    if images == 0:
        for layer, (mean, var, tracked) in zip(layers, saved, strict=True):
            layer.running_mean.copy_(mean)  # type: ignore[union-attr]
            layer.running_var.copy_(var)  # type: ignore[union-attr]
            layer.num_batches_tracked.copy_(tracked)  # type: ignore[union-attr]
    return images


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of each row's softmax: 0 for a certain prediction, ``log C`` for
    a uniform one over C classes."""
    log_probs = torch.log_softmax(logits.float(), dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1)
