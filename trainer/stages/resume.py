"""What a resumed run may change: its settings come from the checkpoint, changes are checked.

A checkpoint records the resolved config of the run that wrote it. A resumed run starts from
that record and overlays only the settings the user gave this time (file, environment, flags),
so a re-run with fewer flags continues the same run instead of silently switching to defaults.
A given setting that differs from the record is either refused (it would change what the
checkpoint means: the model, the data it sees, the phase plan, the optimisation or
augmentation recipe) or accepted and logged (where outputs go, performance, logging, stopping,
the export). docs/trainer.md lists both.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoint import EPOCH_DONE, PHASE_ORDER, Checkpoint
from trainer.config import (
    DECIDED_BY_PROBE,
    FIELDS,
    RESOLVED_AT_START,
    TrainConfig,
    convert,
    validate,
)
from trainer.data.folders import DatasetSplit, fingerprint_changes
from trainer.errors import ConfigError, DataError
from trainer.finetune.phases import Phase

log = logging.getLogger(__name__)

# Settings whose change would make the continued run something else than the checkpoint's:
# the model and its input, the data split, the phase plan, the optimiser and its schedule,
# the loss and the augmentation.
MEANING_CHANGING = frozenset(
    {
        "arch",
        "weights",
        "init",
        "image_size",
        "head_hidden",
        "head_dropout",
        "seed",
        "val_fraction",
        "batch_size",
        "head_epochs",
        "finetune_epochs",
        "unfreeze",
        "lr",
        "head_lr",
        "lr_decay",
        "warmup_fraction",
        "weight_decay",
        "freeze_bn",
        "grad_clip",
        "label_smoothing",
        "class_balance",
        "feature_views",
        "augment",
        "random_resized_crop",
        "crop_scale_min",
        "hflip",
        "vflip",
        "rotate90",
        "rotation",
        "color_jitter",
        "auto_augment",
        "random_erasing",
        "invert",
        "mixup_alpha",
        "cutmix_alpha",
        "ema",
        "ema_decay",
        "unlabeled_data",
        "alignment_weight",
        "forgetting_guard",
        "forgetting_weight",
    }
)
# Settings a resumed run may change: where things are and go, speed and memory, logging,
# stopping, and the export after training. A change is logged.
SAFE_TO_CHANGE = frozenset(
    {
        "data",
        "device",
        "model_name",
        "repository",
        "export",
        "input_format",
        "precision",
        "strict_data",
        "cache_max_mb",
        "num_workers",
        "feature_cache_mb",
        "calibrate",
        "weight_interpolation",
        "patience",
        "amp",
        "channels_last",
        "compile",
        "deterministic",
        "stop_timeout",
        "metrics_port",
        "log_format",
    }
)
# Never taken from the checkpoint: this run's own place and how it found the checkpoint.
THIS_RUN_ONLY = frozenset({"output", "resume"})
# An unset value of these means "the run's default", which for a resumed run is the record.
# ``init`` is decided by the head stage (trainer.stages.init_choice), ``invert`` from the
# images' polarity at set-up (trainer.data.polarity).
_UNSET_MEANS_RECORDED = RESOLVED_AT_START | DECIDED_BY_PROBE | {"image_size", "init", "invert"}


def recorded_settings(resume: Checkpoint) -> dict[str, Any]:
    """The checkpoint's recorded config, typed; the image size from its preprocessing.

    Keys this trainer no longer knows are dropped (an older checkpoint).
    """
    record = resume.header.config or {}
    values = {
        name: convert(name, value, f"the checkpoint's config: {name}")
        for name, value in record.items()
        if name in FIELDS and name not in THIS_RUN_ONLY
    }
    if values.get("image_size") is None:
        values["image_size"] = resume.header.preprocessing.input_size[0]
    return values


@dataclass(frozen=True)
class ResumedSettings:
    """A resumed run's config and how the given settings differ from the checkpoint's.

    Attributes:
        config: the checkpoint's record < the settings given this time.
        changed: name -> (recorded, new) for every setting that differs.
        checkpoint: the checkpoint's identity for messages (its phase and epoch).
    """

    config: TrainConfig
    changed: dict[str, tuple[Any, Any]]
    checkpoint: Checkpoint

    def check(self, split: DatasetSplit, data: Path) -> None:
        """Refuse meaning-changing changes and other data; log the safe changes.

        The data may move (``--data`` is safe to change) but must be the checkpoint's: the
        same classes, file list and file sizes (``trainer.data.folders.dataset_fingerprint``).

        Raises:
            ConfigError: one message naming every refused setting with both values.
            DataError: ``data`` is not the data the checkpoint was trained on.
        """
        changed = dict(self.changed)
        recorded_classes = list(self.checkpoint.header.classes)
        if recorded_classes != list(split.classes):
            changed["classes"] = (recorded_classes, list(split.classes))
        refused = {k: v for k, v in changed.items() if k in MEANING_CHANGING or k == "classes"}
        if refused:
            raise ConfigError(_refusal(refused, self.checkpoint))
        recorded = self.checkpoint.header.dataset_fingerprint or {}
        differs = fingerprint_changes(recorded, split.fingerprint)
        if differs:
            raise DataError(
                f"resume: {data} is not the data the checkpoint in this output was trained on "
                f"(differs in {', '.join(differs)}; {recorded.get('file_count')} files then, "
                f"{split.fingerprint['file_count']} now); use --resume never or another --output"
            )
        if changed:
            log.info(
                "resume: settings changed since the checkpoint (safe to change): %s",
                _describe(changed),
            )


def settings_for_resume(
    config: TrainConfig, given: Collection[str] | None, resume: Checkpoint
) -> ResumedSettings:
    """The config a resumed run continues with: the checkpoint's record < the given settings.

    Args:
        config: this run's config (defaults < file < environment < flags).
        given: the names of the settings the user gave; None: all of them.
        resume: the checkpoint the run continues from.

    Raises:
        ConfigError: the merged config is invalid.
    """
    recorded = recorded_settings(resume)
    names = set(FIELDS) if given is None else set(given)
    taken = {
        name: value
        for name, value in recorded.items()
        if name not in names or (name in _UNSET_MEANS_RECORDED and _is_unset(config, name))
    }
    merged = dataclasses.replace(config, **taken)
    validate(merged)
    changed = {
        name: (recorded[name], getattr(merged, name))
        for name in sorted(recorded)
        if recorded[name] != getattr(merged, name)
    }
    return ResumedSettings(merged, changed, resume)


def _is_unset(config: TrainConfig, name: str) -> bool:
    value = getattr(config, name)
    return value is None or value == ""


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(
        f"{name}: {_show(old)} -> {_show(new)}" for name, (old, new) in changes.items()
    )


def _show(value: Any) -> str:
    return str(value) if isinstance(value, Path) else repr(value)


def _refusal(changes: Mapping[str, tuple[Any, Any]], resume: Checkpoint) -> str:
    return (
        "resume: the checkpoint was trained with other settings, and changing these would "
        f"change what it means: {_describe(changes)}. Leave them out (a resumed run takes "
        "every setting not given from its checkpoint) or give the recorded values; to train "
        "with the new ones start a new run (--resume never, or another --output; "
        f"--weights PATH starts from the checkpoint's weights). Checkpoint position: "
        f"{resume.position.phase} epoch {resume.position.epoch}."
    )


def training_is_finished(resume: Checkpoint, phases: list[Phase]) -> bool:
    """Whether ``resume`` stands at the end of the last phase (or its early stop)."""
    if not phases:
        return False
    last = phases[-1]
    position = resume.position
    return (
        position.phase_index == PHASE_ORDER[last.name]
        and position.step == EPOCH_DONE
        and (position.epoch >= last.epochs or resume.progress.phase(last.name).early_stopped)
    )
