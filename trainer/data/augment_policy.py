"""``--augment auto``: augmentation chosen from the data, each decision with its evidence.

Two rules:

* **Crop scale from the image size.** A random-resized crop keeping 25% of the area is an
  ImageNet habit for 224 px photographs of large objects; on a 32-64 px image it often cuts the
  object out. The smallest kept area share is 0.6 at 64 px and below, 0.25 at 160 px and above,
  and linear in the side length between (``crop_scale_for``).
* **Label-changing transforms are tested, not assumed.** Horizontal flip, vertical flip and 90°
  rotation keep the label of a photograph of a cat, and change it for an arrow pointing left
  or a digit. Before phase 2 the converged linear probe on the frozen features classifies the
  val images plain and transformed: when the transformed accuracy is lower by more than a noise
  margin (two binomial standard errors of the plain accuracy, at least one image's worth), the
  transform changes labels for this data and stays off; otherwise it is on. An explicit flag
  (``--hflip``/``--no-hflip`` ...) always wins and is recorded as such.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainer.augment_defaults import CANDIDATES
from trainer.progress import log_event

log = logging.getLogger(__name__)

NOISE_STANDARD_ERRORS = 2.0


@dataclass(frozen=True)
class AugmentDecision:
    """Whether a candidate transform is on, and why.

    ``source`` is ``flag`` (the user's), ``tested`` (the probe's evidence below) or
    ``untested`` (no probe could run; the conventional default).
    """

    name: str
    enabled: bool
    source: str
    accuracy: float | None = None
    transformed_accuracy: float | None = None
    margin: float | None = None
    count: int = 0

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"enabled": self.enabled, "source": self.source}
        if self.source == "tested":
            document |= {
                "accuracy": round(float(self.accuracy or 0.0), 4),
                "transformed_accuracy": round(float(self.transformed_accuracy or 0.0), 4),
                "margin": round(float(self.margin or 0.0), 4),
                "val_images": self.count,
            }
        return document


def noise_margin(accuracy: float, count: int) -> float:
    """Two binomial standard errors of ``accuracy`` on ``count`` images (at least 1/count)."""
    if count == 0:
        return 1.0
    standard_error = math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / count)
    return max(NOISE_STANDARD_ERRORS * standard_error, 1.0 / count)


def assess_transform(
    name: str,
    predict: Callable[[torch.Tensor], torch.Tensor],
    plain: torch.Tensor,
    transformed: torch.Tensor,
    labels: torch.Tensor,
) -> AugmentDecision:
    """The decision for ``name`` from the probe's accuracy on plain and transformed features."""
    count = len(labels)
    accuracy = float((predict(plain).argmax(1) == labels).float().mean()) if count else 0.0
    after = float((predict(transformed).argmax(1) == labels).float().mean()) if count else 0.0
    margin = noise_margin(accuracy, count)
    enabled = accuracy - after <= margin
    return AugmentDecision(name, enabled, "tested", accuracy, after, margin, count)


def decide(
    user: Mapping[str, bool | None],
    predict: Callable[[torch.Tensor], torch.Tensor] | None,
    val: tuple[torch.Tensor, torch.Tensor] | None,
    transformed: Mapping[str, torch.Tensor],
) -> dict[str, AugmentDecision]:
    """One decision per candidate: the user's flag, else the probe's test, else the default.

    Args:
        user: each candidate's config value (None: not given).
        predict: the converged probe (features -> logits), or None when no probe ran.
        val: the plain val features and labels.
        transformed: the val features under each candidate transform.
    """
    decisions = {}
    for name, conventional in CANDIDATES.items():
        given = user.get(name)
        if given is not None:
            decisions[name] = AugmentDecision(name, bool(given), "flag")
        elif predict is not None and val is not None and name in transformed:
            decisions[name] = assess_transform(name, predict, val[0], transformed[name], val[1])
        else:
            decisions[name] = AugmentDecision(name, conventional, "untested")
        log_event(log, "augment_decision", name=name, **decisions[name].to_dict())
    return decisions
