"""Whether a model's val accuracy is barely above guessing, and the warning that says so.

A from-scratch source trained too briefly reaches about chance (0.24 on five classes, chance
0.20) and still exports and fine-tunes without complaint; its features are then noise to
fine-tune from. The rule is a quarter of the way from chance to perfect: 0.40 on five classes,
0.625 on two, 0.325 on ten.
"""

from __future__ import annotations

import logging

#: Share of the distance from chance to perfect accuracy below which a model is near chance.
NEAR_CHANCE_SHARE = 0.25


def near_chance_limit(num_classes: int) -> float:
    """The val accuracy below which a ``num_classes`` model counts as near chance."""
    chance = 1.0 / num_classes
    return chance + NEAR_CHANCE_SHARE * (1.0 - chance)


def near_chance_warning(what: str, accuracy: float, num_classes: int) -> str | None:
    """A one-line warning when ``accuracy`` is near chance (None otherwise or when unknown)."""
    if accuracy < 0 or num_classes < 2 or accuracy >= near_chance_limit(num_classes):
        return None
    return (
        f"{what} reached only {accuracy:.3f} val accuracy on {num_classes} classes (chance "
        f"{1.0 / num_classes:.3f}, near-chance below {near_chance_limit(num_classes):.3f}): "
        "its predictions are barely better than guessing; train it longer (more epochs, see "
        "README 'Your first model, offline') before relying on it or fine-tuning from it"
    )


def warn_if_near_chance(
    logger: logging.Logger, what: str, accuracy: float, num_classes: int
) -> bool:
    """Log ``near_chance_warning`` as a warning when it applies; returns whether it did."""
    warning = near_chance_warning(what, accuracy, num_classes)
    if warning:
        logger.warning(warning)
    return warning is not None
