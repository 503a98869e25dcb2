"""A converged linear probe on frozen features (the "LP" of LP-FT, Kumar et al., ICLR 2022).

The head is fitted with full-batch L-BFGS on cached features, for several L2 strengths, and the
strength with the best validation accuracy (then the lowest validation loss) wins: the CLIP
linear-probe protocol. On a few thousand cached feature vectors this converges in seconds,
where a few dozen Adam steps through the backbone leave a random head near chance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

# L2 strengths tried, in units of the mean cross-entropy (weight decay on the weights only).
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
MAX_ITERATIONS = 500
# Stop where the largest gradient entry is this small. Measured on the digits task of
# benchmarks/transfer_quality.py (1,600 x 512 features): in float64 to 1e-7 the five fits took
# 9.8 s and ran into MAX_ITERATIONS at the small strengths; float32 to 1e-5 took 3.2 s with
# every strength's val accuracy and loss the same to three decimals.
GRADIENT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ProbeResult:
    """The fitted head's parameters and how it did on the validation features."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    train_accuracy: float
    val_accuracy: float
    val_loss: float
    trials: tuple[tuple[float, float, float], ...]  # (l2, val accuracy, val loss)

    def load_into(self, head: nn.Linear) -> None:
        """Copy the fitted parameters into ``head`` (same shape)."""
        with torch.no_grad():
            head.weight.copy_(self.weight.to(head.weight))
            head.bias.copy_(self.bias.to(head.bias))


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One intra-op thread for the duration: the fits here are many tiny ops, where the
    thread pool's per-op hand-off costs more than the op (on a busy 2-core machine, a probe
    that takes 0.1 s on one thread took 30 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class LabelledFeatures(NamedTuple):
    """Pooled backbone features (N, D) and their class indices (N,)."""

    features: torch.Tensor
    labels: torch.Tensor


@single_threaded()
def fit_linear_probe(
    train: LabelledFeatures,
    val: LabelledFeatures,
    num_classes: int,
    l2_grid: Sequence[float] = L2_GRID,
    class_weights: torch.Tensor | None = None,
) -> ProbeResult:
    """Fit a multinomial logistic regression for each L2 strength; keep the best on val."""
    x = train.features.detach().float()
    y = train.labels.detach().long()
    vx = val.features.detach().float()
    vy = val.labels.detach().long()
    # Standardising the features makes one grid of strengths fit every backbone's scale; the
    # scaling is folded back into the weights, so the head still takes raw features.
    mean = x.mean(0)
    scale = x.std(0).clamp_min(1e-6)
    weights = None if class_weights is None else class_weights.float()
    best: ProbeResult | None = None
    trials = []
    standardised = (x - mean) / scale
    start: tuple[torch.Tensor, torch.Tensor] | None = None
    # Strongest L2 first, each fit warm-started from the previous one: the path of solutions
    # is smooth in the strength, so each later fit needs a fraction of the iterations.
    for l2 in sorted(l2_grid, reverse=True):
        weight, bias = _fit(standardised, y, num_classes, l2, weights, start)
        start = (weight, bias)
        raw_weight = weight / scale
        raw_bias = bias - (mean / scale) @ weight.T
        val_logits = vx @ raw_weight.T + raw_bias
        val_loss = float(F.cross_entropy(val_logits, vy))
        val_accuracy = float((val_logits.argmax(1) == vy).float().mean()) if len(vy) else 0.0
        trials.append((l2, val_accuracy, val_loss))
        if best is None or (val_accuracy, -val_loss) > (best.val_accuracy, -best.val_loss):
            train_accuracy = float(((x @ raw_weight.T + raw_bias).argmax(1) == y).float().mean())
            best = ProbeResult(
                raw_weight.float(), raw_bias.float(), l2, train_accuracy, val_accuracy, val_loss, ()
            )
    assert best is not None, "l2_grid is empty"
    return ProbeResult(**{**best.__dict__, "trials": tuple(trials)})


def _fit(  # noqa: PLR0913  the data, the strength and the warm start of one fit
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    weights: torch.Tensor | None,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if start is None:
        weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    else:
        weight = start[0].clone().requires_grad_(True)
        bias = start[1].clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=MAX_ITERATIONS, history_size=20,
        tolerance_grad=GRADIENT_TOLERANCE, tolerance_change=1e-10, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y, weight=weights) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()
