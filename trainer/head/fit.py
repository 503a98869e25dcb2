"""Fitting the head on cached features: the converged "LP" of LP-FT, and its cheap variants.

* A linear head is fitted with ``linear_probe.fit_linear_probe`` (L-BFGS, L2 chosen on val).
* A small multi-layer head (Linear/activation/Dropout/LayerNorm/Flatten, no BatchNorm) trains
  on the same features with full-batch Adam for a few hundred epochs, from the linear probe's
  solution where the shapes allow; cheap, since no image goes through the backbone.
* Any other head (BatchNorm inside) is left to the streaming head phase.

The linear probe on the flattened features is always fitted: it is also what
``augment_policy`` tests the candidate transforms with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

from trainer.head.linear_probe import (
    LabelledFeatures,
    ProbeResult,
    fit_linear_probe,
    single_threaded,
)

LINEAR_PROBE = "linear-probe"
CACHED_ADAM = "cached-adam"
CACHED_EPOCHS = 300
CACHED_LR = 1e-3
_SIMPLE_LAYERS = (
    nn.Linear,
    nn.ReLU,
    nn.GELU,
    nn.Hardswish,
    nn.SiLU,
    nn.Dropout,
    nn.Flatten,
    nn.LayerNorm,
    nn.Identity,
    nn.Sequential,
)


@dataclass(frozen=True)
class HeadFit:
    """How the head was fitted on the cache, and how it did on val."""

    method: str
    val_accuracy: float
    val_loss: float
    train_loss: float
    train_accuracy: float
    l2: float | None
    views: int
    train_rows: int
    seconds: float
    cache: str
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        """For ``summary.json`` and the metrics record."""
        return {
            "method": self.method,
            "val_accuracy": round(self.val_accuracy, 4),
            "val_loss": round(self.val_loss, 4),
            "train_accuracy": round(self.train_accuracy, 4),
            "l2": self.l2,
            "views": self.views,
            "train_rows": self.train_rows,
            "seconds": round(self.seconds, 2),
            "cache": self.cache,
        }


def head_kind(head: nn.Module) -> str | None:
    """``linear-probe``, ``cached-adam`` or None (streamed) for this head module."""
    if isinstance(head, nn.Linear):
        return LINEAR_PROBE
    if all(isinstance(m, _SIMPLE_LAYERS) for m in head.modules()):
        return CACHED_ADAM
    return None


def flat(features: LabelledFeatures) -> LabelledFeatures:
    return LabelledFeatures(features.features.flatten(1), features.labels)


def probe_predictor(probe: ProbeResult):
    """Features (any shape, flattened) -> logits of the fitted linear probe."""

    def predict(features: torch.Tensor) -> torch.Tensor:
        return features.flatten(1).float() @ probe.weight.T + probe.bias

    return predict


def fit_probe(
    train: LabelledFeatures,
    val: LabelledFeatures,
    num_classes: int,
    class_weights: torch.Tensor | None,
) -> ProbeResult:
    """The linear probe on the flattened features."""
    return fit_linear_probe(flat(train), flat(val), num_classes, class_weights=class_weights)


def fit_head(  # noqa: PLR0913  the head, its data and the facts recorded with the fit
    head: nn.Module,
    probe: ProbeResult,
    train: LabelledFeatures,
    val: LabelledFeatures,
    *,
    num_classes: int,
    class_weights: torch.Tensor | None,
    views: int,
    cache: str,
    started: float,
    label_smoothing: float = 0.0,
) -> HeadFit:
    """Load ``probe`` into a linear ``head``, or train a small head on the features."""
    kind = head_kind(head)
    if kind == LINEAR_PROBE:
        assert isinstance(head, nn.Linear)
        probe.load_into(head)
        with single_threaded():
            _match_smoothing(head, train, label_smoothing)
    elif kind == CACHED_ADAM:
        with single_threaded():
            _train_cached(head, train, class_weights, label_smoothing)
    else:
        raise ValueError("this head is not fitted on cached features")
    device = next(head.parameters()).device
    train_loss, train_accuracy, _ = _score(head, train, num_classes, device)
    val_loss, val_accuracy, confusion = _score(head, val, num_classes, device)
    return HeadFit(
        method=kind,
        val_accuracy=val_accuracy,
        val_loss=val_loss,
        train_loss=train_loss,
        train_accuracy=train_accuracy,
        l2=probe.l2 if kind == LINEAR_PROBE else None,
        views=views,
        train_rows=len(train.labels),
        seconds=time.perf_counter() - started,
        cache=cache,
        confusion=confusion,
    )


def _match_smoothing(head: nn.Linear, train: LabelledFeatures, label_smoothing: float) -> None:
    """Scale the probe's logits to phase 2's label-smoothed loss (predictions unchanged).

    The probe minimises plain cross-entropy, so on separable features its logits are huge;
    phase 2's label-smoothed loss on such logits is large, and its first gradients would
    distort the features the probe was fitted on. One scalar 1/s fitted on the cached training
    features (minimum smoothed loss) fixes that without changing any arg-max.
    """
    if label_smoothing <= 0:
        return
    with torch.no_grad():
        logits = (train.features.flatten(1).to(head.weight) @ head.weight.T + head.bias).double()
    labels = train.labels.to(logits.device)
    log_scale = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_scale.exp(), labels, label_smoothing=label_smoothing)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    scale = float(log_scale.detach().exp())
    with torch.no_grad():
        head.weight.div_(scale)
        head.bias.div_(scale)


def _train_cached(
    head: nn.Module,
    train: LabelledFeatures,
    class_weights: torch.Tensor | None,
    label_smoothing: float,
) -> None:
    """Full-batch Adam on the cached features (dropout active, as in streaming training)."""
    device = next(head.parameters()).device
    x = train.features.to(device)
    y = train.labels.to(device)
    weight = None if class_weights is None else class_weights.to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=CACHED_LR)
    head.train()
    with torch.enable_grad():
        for _ in range(CACHED_EPOCHS):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(head(x), y, weight=weight, label_smoothing=label_smoothing)
            loss.backward()
            optimizer.step()
    head.eval()


@torch.no_grad()
def _score(
    head: nn.Module, data: LabelledFeatures, num_classes: int, device: torch.device
) -> tuple[float, float, list[list[int]]]:
    head.eval()
    logits = head(data.features.to(device)).float().cpu()
    labels = data.labels.long()
    if len(labels) == 0:
        return float("nan"), 0.0, [[0] * num_classes for _ in range(num_classes)]
    loss = float(F.cross_entropy(logits, labels))
    predicted = logits.argmax(1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    accuracy = float((predicted == labels).float().mean())
    return loss, accuracy, confusion.view(num_classes, num_classes).tolist()
