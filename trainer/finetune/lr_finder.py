"""``--lr auto``: phase 2's learning rate from an LR range test (Smith 2017; fastai's lr_find).

The test trains for a few steps while the learning rate of the unfrozen body groups grows
geometrically from ``START_LR`` to ``END_LR`` (the fitted head is held still, so the curve
is about the groups being unfrozen), records the loss of every step and smooths it.
Two shapes, two rules:

* **The loss falls** (by ``MIN_DROP`` or more below its start, the median loss of the sweep's
  first quarter, whose rates are too small to move the weights: differences there are batch
  noise): a tenth of the rate at the smoothed minimum after that quarter, where the loss still
  falls steeply and is far from where it blows up (fastai's "minimum / 10").
* **The loss is flat, then climbs** (the usual shape after a converged head: there is little
  left to gain at first): a tenth of the first rate at which the smoothed loss exceeds
  ``BLOW_UP`` times its lowest value so far, the edge of stable training (Smith's "largest
  rate before the loss climbs", with the same safety factor).

A curve that does neither says nothing about the rate; the classic 1e-4 is used then and the
reason logged. Suggestions are clamped to ``MIN_SUGGESTION``..``MAX_SUGGESTION``.

The pure part (``suggest_lr``) works on the curve alone; ``LRFinding`` is what the run records
(``report/lr_find.json`` and ``summary.json``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

START_LR, END_LR = 1e-6, 1e-1
FALLBACK_LR = 1e-4
# Suggestions outside this range are clamped: below it nothing trains, and above it Adam moves
# pretrained weights faster than fine-tuning can keep their features (with the head held still
# the body's loss climbs only at 1e-2 to 5e-2, so a tenth of that is still too fast).
MIN_SUGGESTION, MAX_SUGGESTION = 1e-6, 1e-3
SMOOTHING = 0.7
MIN_DROP = 0.10
BLOW_UP = 1.5


@dataclass(frozen=True)
class LRFinding:
    """The range test's curve and the rate it suggests (or the fallback, and why)."""

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    suggestion: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """For ``report/lr_find.json`` and ``summary.json``."""
        return {
            "suggestion": self.suggestion,
            "reason": self.reason,
            "lrs": list(self.lrs),
            "losses": list(self.losses),
            "smoothed": list(self.smoothed),
        }


def sweep_lrs(steps: int, start: float = START_LR, end: float = END_LR) -> list[float]:
    """The geometric schedule of the test: ``steps`` rates from ``start`` to ``end``."""
    if steps < 2:
        raise ValueError(f"an LR range test needs at least 2 steps, got {steps}")
    ratio = end / start
    return [start * ratio ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: Sequence[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction; a non-finite loss stays infinite."""
    smoothed, average = [], 0.0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            smoothed.append(math.inf)
            continue
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta ** (i + 1)))
    return smoothed


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> LRFinding:
    """The suggested rate for a recorded curve (``lrs[i]`` was used for step ``i``)."""
    if len(lrs) != len(losses) or len(lrs) < 2:
        raise ValueError("the curve needs one loss per learning rate, and at least 2 points")
    smoothed = smooth(losses)
    finite = [(value, i) for i, value in enumerate(smoothed) if math.isfinite(value)]
    curve = (tuple(lrs), tuple(losses), tuple(smoothed))
    if not finite:
        return LRFinding(*curve, FALLBACK_LR, "no finite loss: fallback")
    # The first quarter of the sweep runs at rates too small to move the weights in a few
    # steps: its losses differ only by batch, so their median is the start, and a minimum
    # among them is noise, not a fall.
    settled = max(1, len(lrs) // 4)
    quiet = [v for v in losses[:settled] if math.isfinite(v)]
    first = statistics.median(quiet) if quiet else finite[0][0]
    later = [(value, i) for value, i in finite if i >= settled]
    lowest, at = min(later) if later else min(finite)
    if later and lowest <= first * (1 - MIN_DROP):
        return LRFinding(
            *curve,
            _clamped(lrs[at] / 10),
            f"smoothed loss lowest ({lowest:.4f}, from {first:.4f}) at lr {lrs[at]:.2e}; "
            "a tenth of it",
        )
    floor = first
    for i, value in enumerate(smoothed):
        floor = min(floor, value)
        if value > BLOW_UP * floor:
            return LRFinding(
                *curve,
                _clamped(lrs[i] / 10),
                f"smoothed loss flat from {first:.4f}, above {BLOW_UP}x its lowest at lr "
                f"{lrs[i]:.2e}; a tenth of it",
            )
    return LRFinding(
        *curve,
        FALLBACK_LR,
        f"the loss neither fell {MIN_DROP:.0%} below its start ({first:.4f}) nor climbed: fallback",
    )


def _clamped(lr: float) -> float:
    return min(MAX_SUGGESTION, max(MIN_SUGGESTION, lr))
