"""Temperature scaling and calibration measures (Guo et al., ICML 2017).

A network trained with cross-entropy (and more so with label smoothing) is over- or
underconfident; one scalar ``T`` fitted on held-out logits to minimise the negative
log-likelihood fixes most of it without changing any prediction, since ``softmax(z / T)``
keeps the order of ``z``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

from contracts.model_metadata import TemperatureCalibration

ECE_BINS = 15
# T outside this range means the logits carry no usable confidence; clamp rather than export
# a graph that turns every answer into a certainty or into a uniform guess.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it did to the held-out split."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    count: int

    def record(self) -> TemperatureCalibration:
        """The record the checkpoint and ``model.json`` carry (rounded to 6 digits)."""
        return TemperatureCalibration(
            temperature=round(self.temperature, 6),
            ece_before=round(self.ece_before, 6),
            ece_after=round(self.ece_after, 6),
            nll_before=round(self.nll_before, 6),
            nll_after=round(self.nll_after, 6),
            count=self.count,
            ece_bins=ECE_BINS,
        )

    def to_dict(self) -> dict[str, Any]:
        """For ``summary.json`` and the report: the record's keys."""
        return self.record().to_dict()


def expected_calibration_error(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """ECE: the mean |accuracy - confidence| over equal-width confidence bins, by count."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges.tolist()):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = (correct[inside].mean() - confidence[inside].mean()).abs()
            total += float(gap) * int(inside.sum())
    return total / max(1, len(labels))


def negative_log_likelihood(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> float:
    """Mean cross-entropy of ``softmax(logits / temperature)``."""
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> Calibration:
    """The temperature minimising the held-out NLL (L-BFGS on log T, so T stays positive)."""
    logits = logits.detach().double()
    labels = labels.detach().long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))
    if not math.isfinite(temperature):
        temperature = 1.0
    nll_before = negative_log_likelihood(logits, labels, 1.0)
    nll_after = negative_log_likelihood(logits, labels, temperature)
    if nll_after > nll_before:
        # A degenerate split (a handful of images, all right) can push T the wrong way.
        temperature, nll_after = 1.0, nll_before
    return Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(logits.softmax(1), labels),
        ece_after=expected_calibration_error((logits / temperature).softmax(1), labels),
        nll_before=nll_before,
        nll_after=nll_after,
        count=len(labels),
    )
