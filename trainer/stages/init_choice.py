"""Whether the source weights are worth starting from: ``--init auto``.

Where the source model's features do not transfer, fine-tuning them is beaten by training
from scratch with the same epochs (benchmarks/transfer_quality.py: scikit-learn's digits
from a source model trained on drawn shapes, 0.936 fine-tuned against 0.968 from scratch),
and no phase-2 policy started from them catches up within the budget. The test that tells:
a linear probe on the features of a random initialisation of the same architecture (seeded,
so every rank and every rerun builds the same one) against the probe already fitted on the
source's features, on the same val split. The random one sees one view of each training
image where the source's saw ``--feature-views``: a third of the test's cost, and a lean
toward the source (fewer rows fit a weaker probe), so a switch needs a clear win.

Random convolutional features are a real baseline on small images (Raghu et al.,
"Transfusion", 2019, found random initialisation on par with ImageNet weights for medical
images); when they score higher, the source's carry nothing this task can use, and the run
becomes the from-scratch recipe (``--init random``: every layer trains from the random
initialisation at ``--head-lr`` with BatchNorm statistics training, the head phase's epochs
added to phase 2's).

Measured on the benchmark's three tasks (source probe, four views, against random-init
probe, one view): demo 0.500 vs 0.225 and photo-patches 0.800 vs 0.667 keep the source;
digits 0.872 vs 0.912 starts from scratch and reaches the scratch run's 0.968. The test runs
only when ``--init``, ``--unfreeze`` and ``--forgetting-guard`` are left to the data and the
head was fitted on cached features.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import INIT_RANDOM, INIT_WEIGHTS
from trainer.finetune.phase_runner import TrainingParts
from trainer.head.stage import FeatureSettings, probe_accuracy
from trainer.job.context import RunContext
from trainer.model.classifier import create_model, head_module_name
from trainer.progress import log_event

log = logging.getLogger(__name__)

RANDOM_INIT_CACHE = "random-init.pt"


@dataclass(frozen=True)
class InitChoice:
    """Where phase 2 starts, and the two probes that decided it."""

    init: str
    source: str
    reason: str
    weights_probe: float | None = None
    random_probe: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """For ``summary.json`` and ``report/strategies.md``."""
        return {
            "init": self.init,
            "source": self.source,
            "reason": self.reason,
            "weights_probe_val_accuracy": self.weights_probe,
            "random_init_probe_val_accuracy": self.random_probe,
        }


def random_initialisation(config: Any, num_classes: int) -> torch.nn.Module:
    """The model a from-scratch run of ``config`` would build, the same on every call: its
    initialisation draws from a generator seeded with ``config.seed``, not the run's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return create_model(
            config.arch,
            num_classes,
            head_hidden=config.head_hidden,
            head_dropout=config.head_dropout,
        )


def choose_init(
    context: RunContext,
    parts: TrainingParts,
    settings: FeatureSettings,
    weights_probe: float,
    class_weights: torch.Tensor | None,
) -> InitChoice:
    """Probe a random initialisation's features; when they beat the source's, load it into
    the trained model (and its EMA copy) and say so."""
    config, header = context.config, context.header
    fresh = random_initialisation(config, header.num_classes).to(context.device)
    random_probe = probe_accuracy(
        fresh,
        head_module_name(fresh),
        parts.pipeline,
        pre=header.preprocessing,
        prepare=parts.step.prepare,
        settings=dataclasses.replace(
            settings,
            views=1,
            cache_name=RANDOM_INIT_CACHE,
            fingerprint_parts=settings.fingerprint_parts | {"init": INIT_RANDOM, "views": 1},
        ),
        info=context.dist,
        num_classes=header.num_classes,
        class_weights=class_weights,
    )
    if random_probe is not None and random_probe > weights_probe:
        module = parts.trained.module
        module.load_state_dict(fresh.state_dict())
        if parts.trained.ema is not None:
            parts.trained.ema.module.load_state_dict(fresh.state_dict())
        init, reason = (
            INIT_RANDOM,
            (
                f"a probe on a random initialisation's features scored {random_probe:.3f} on val, "
                f"above the {weights_probe:.3f} on the --weights' features: they carry nothing "
                "this task can use, so every layer trains from scratch"
            ),
        )
    else:
        init, reason = (
            INIT_WEIGHTS,
            (
                f"the probe on the --weights' features scored {weights_probe:.3f} on val, a random "
                f"initialisation's {_score(random_probe)}"
            ),
        )
    log_event(
        log,
        "init_choice",
        init=init,
        weights_probe=round(weights_probe, 4),
        random_init_probe=None if random_probe is None else round(random_probe, 4),
        reason=reason,
    )
    return InitChoice(init, "test", reason, weights_probe, random_probe)


def _score(accuracy: float | None) -> str:
    return (
        "untested (its features exceed feature_cache_mb)"
        if accuracy is None
        else (f"{accuracy:.3f}")
    )
