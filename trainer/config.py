"""The trainer's one typed config and how it is resolved.

Precedence: field defaults < YAML file (``--config``) < environment (``TRAINER_<FIELD>``) <
command-line flags, read by ``contracts.settings.SettingsLoader``. Every field is a flag
(``head_lr`` -> ``--head-lr``) and an environment variable (``TRAINER_HEAD_LR``). Unknown keys
and bad values are ``ConfigError``s naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contracts.atomic_files import atomic_write_bytes
from contracts.graph_signature import DEFAULT_INPUT_FORMAT, INPUT_FORMATS
from contracts.repository_layout import InvalidModelName, validate_model_name
from contracts.settings import (
    SettingError,
    SettingsFileError,
    SettingsLoader,
    SettingValueError,
    UnknownSettingError,
)
from trainer.errors import ConfigError

ENV_PREFIX = "TRAINER_"
# The smallest training crop in pixels (``trainer.model.weights.preprocessing_for`` keeps to
# it too).
MIN_IMAGE_SIZE = 16


def _doc(text: str, default: Any, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": text, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as ``OUTPUT/config.yaml``."""

    data: Path | None = _doc("ImageFolder root: train/<class>/*, optional val/.", None)  # noqa: RUF009
    output: Path | None = _doc("Directory for checkpoints, metrics, report.", None)  # noqa: RUF009
    arch: str = _doc("torchvision classification architecture name.", "resnet18")
    weights: str = _doc(
        "Starting weights: DEFAULT, a torchvision weights name, none, or a PATH to a state "
        "dict or trainer checkpoint.",
        "DEFAULT",
    )
    init: str = _doc(
        "Where phase 2 starts: weights (the --weights), random (a random initialisation: the "
        "from-scratch recipe, every epoch training every layer), or auto: the --weights, "
        "unless a linear probe on a random initialisation's features scores higher on val "
        "than the probe on theirs (docs/trainer.md).",
        "",
    )
    image_size: int | None = _doc(
        "Training/eval crop size in pixels; default: the weights' own (224 without metadata).",
        None,
    )
    batch_size: int = _doc("Images per step on each process.", 32)
    head_epochs: int | None = _doc(
        "Epochs of phase 1 (head only); default 2, or 0 with --weights none.", None
    )
    finetune_epochs: int = _doc("Epochs of phase 2 (fine-tuning unfrozen groups).", 5)
    device: str = _doc("Where to train.", "auto", ("auto", "cpu", "cuda"))
    seed: int = _doc("Seed for every random number generator.", 0)
    resume: str = _doc(
        "auto: continue from the newest valid checkpoint in OUTPUT; never; or a PATH.", "auto"
    )
    model_name: str = _doc("Model name in the exported model repository.", "classifier")
    repository: Path | None = _doc("Export target; default OUTPUT/model_repository.", None)  # noqa: RUF009
    export: bool = _doc("Export best.pt to ONNX at the end of the run.", True)
    input_format: str = _doc("Exported graph input.", DEFAULT_INPUT_FORMAT, INPUT_FORMATS)
    precision: str = _doc("Exported model precision.", "fp32", ("fp32", "fp16", "int8"))
    val_fraction: float = _doc(
        "Share of each class held out for validation when there is no val/ folder.", 0.2
    )
    strict_data: bool = _doc("Fail on corrupt or unreadable images instead of skipping.", False)
    cache_max_mb: int = _doc(
        "Decode the dataset once into memory when it fits in this many MiB (0: never).", 2048
    )
    num_workers: int | None = _doc(
        "DataLoader worker processes; default: 0 for an in-memory dataset, else min(8, CPUs).",
        None,
    )
    head_hidden: int | None = _doc("Hidden units of a two-layer head; default: one Linear.", None)
    head_dropout: float = _doc("Dropout before the head's last Linear.", 0.0)
    feature_views: int = _doc(
        "Views per training image in the head phase's feature cache: the eval crop plus "
        "views-1 augmented ones.",
        4,
    )
    feature_cache_mb: int = _doc(
        "Largest feature cache of the head phase (memory and disk); above it the head phase "
        "streams images through the backbone (0: always stream).",
        512,
    )
    class_balance: str = _doc(
        "auto: class-weighted loss (and probe) when the largest class has >= 3x the training "
        "images of the smallest; off: plain loss.",
        "auto",
        ("auto", "off"),
    )
    calibrate: str = _doc(
        "Fit a softmax temperature on the val split after training and export calibrated "
        "probabilities (on), or not (off).",
        "on",
        ("on", "off"),
    )
    weight_interpolation: str = _doc(
        "After phase 2, score mixes of the head phase's weights and phase 2's last ones on "
        "val (WiSE-FT) and keep the best mix when it beats the best epoch (on), or not (off; "
        "the default: no mix beat both ends on the benchmark's tasks).",
        "off",
        ("on", "off"),
    )
    unlabeled_data: Path | None = _doc(  # noqa: RUF009
        "Folder of unlabelled images from where the model is used (searched recursively, "
        "names ignored: the server's capture directory works as it is). Phase 2 aligns the "
        "pooled features of labelled and unlabelled batches (MMD), and BatchNorm statistics "
        "re-estimated on them (AdaBN) are kept when val accuracy does not drop.",
        None,
    )
    alignment_weight: float = _doc(
        "Largest weight of phase 2's MMD alignment term (--unlabeled-data), reached by "
        "DANN's ramp 2/(1+exp(-10p))-1 over the phase (0: no alignment term). 10 measured "
        "best of 0, 3, 10 and 30 on benchmarks/domain_shift.py.",
        10.0,
    )
    forgetting_guard: str = _doc(
        "Hold phase 2 near the --weights it starts from: ewc (the source checkpoint's "
        "Fisher information), l2sp (plain distance to the source weights), off, or auto: "
        "ewc when the source checkpoint stores a Fisher, l2sp for another weights file, off "
        "for torchvision weights and none.",
        "auto",
        ("auto", "ewc", "l2sp", "off"),
    )
    forgetting_weight: float = _doc(
        "Scale of the forgetting guard's penalty: 1 is EWC's Laplace weight (source train "
        "images / (2 x this run's)) or L2-SP's alpha/2 with alpha 0.1.",
        1.0,
    )
    unfreeze: str = _doc(
        "Phase-2 policy: top:K (the top K layer groups), all, gradual:N (one more group "
        "every N epochs), or auto: short trials of top:1, top:2 and all from the fitted head "
        "pick one (docs/trainer.md); from scratch: all.",
        "",
    )
    lr: float | None = _doc(
        "Phase-2 LR of the top unfrozen group: a positive number, or auto: an LR range test "
        "from the fitted head picks it (report/lr_find.json); from scratch: head_lr.",
        None,
    )
    head_lr: float = _doc("Learning rate of the head (phase 1, and phase 2).", 1e-3)
    lr_decay: float | None = _doc(
        "Group at depth d below the top gets lr * lr_decay**d, in (0, 1]; or auto: the "
        "phase-2 search tries 0.3 and 1 (flat) with --unfreeze auto; 0.3 with a given "
        "--unfreeze; from scratch: 1.",
        None,
    )
    warmup_fraction: float = _doc("Share of each phase's steps with linear LR warmup.", 0.1)
    weight_decay: float = _doc("AdamW weight decay (never on norms and biases).", 0.05)
    freeze_bn: bool | None = _doc(
        "Keep BatchNorm statistics frozen in the unfrozen groups in phase 2 too; default on "
        "from pretrained weights (the head was fitted on features made with those "
        "statistics), off from scratch.",
        None,
    )
    patience: int = _doc("Stop a phase after this many epochs without a better val accuracy.", 5)
    grad_clip: float = _doc("Clip the gradient norm to this value (0: off).", 1.0)
    label_smoothing: float = _doc("Label smoothing of the cross-entropy loss.", 0.1)
    augment: str = _doc(
        "auto: the crop scale from the image size and each of hflip, vflip and rotate90 "
        "tested on the frozen features (docs/trainer.md); fixed: crop scale 0.25, hflip on, "
        "vflip and rotate90 off. An explicit flag always wins.",
        "auto",
        ("auto", "fixed"),
    )
    random_resized_crop: bool = _doc("RandomResizedCrop for training (else resize+crop).", True)
    crop_scale_min: float | None = _doc(
        "Smallest area share kept by RandomResizedCrop; default from --augment.", None
    )
    hflip: bool | None = _doc("Random horizontal flip.", None)
    vflip: bool | None = _doc("Random vertical flip.", None)
    rotate90: bool | None = _doc("Random rotation by a multiple of 90 degrees.", None)
    rotation: float = _doc("Random rotation range in degrees (0: off).", 0.0)
    color_jitter: float = _doc("Brightness/contrast/saturation jitter strength (0: off).", 0.0)
    auto_augment: str = _doc("Automatic augmentation policy.", "none", ("none", "trivial", "rand"))
    random_erasing: float = _doc("RandomErasing probability (0: off).", 0.0)
    invert: float | None = _doc(
        "Probability of inverting a labelled training image's intensities (255 - x). "
        "auto (the default): with --unlabeled-data, the probability that matches the "
        "labelled images' contrast polarity (centre brighter than border) to the unlabelled "
        "images', when that differs beyond noise; else 0.",
        None,
    )
    mixup_alpha: float = _doc("MixUp alpha (0: off).", 0.0)
    cutmix_alpha: float = _doc("CutMix alpha (0: off).", 0.0)
    amp: str = _doc(
        "Mixed precision: auto (bf16 where supported and faster, fp16+GradScaler on older GPUs).",
        "auto",
        ("auto", "off", "bf16", "fp16"),
    )
    channels_last: bool | None = _doc("channels_last memory format; default: on CUDA.", None)
    compile: bool = _doc("torch.compile the model (recompiled at every phase change).", False)
    ema: bool = _doc("Keep an exponential moving average of the weights; export it.", False)
    ema_decay: float = _doc("EMA decay per step.", 0.999)
    deterministic: bool = _doc("Use deterministic algorithms only (slower).", False)
    stop_timeout: float = _doc(
        "Seconds allowed between SIGTERM and exit (finish step, save checkpoint).", 20.0
    )
    metrics_port: int | None = _doc("Serve Prometheus training gauges on this port.", None)
    log_format: str = _doc("Log line format when not on a terminal.", "plain", ("plain", "json"))

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (paths as strings): for YAML and the checkpoint."""
        return {
            f.name: str(v) if isinstance(v, Path) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Fields whose default depends on other settings; ``resolve_defaults`` fills them in.
RESOLVED_AT_START = frozenset(
    {
        "head_epochs",
        "unfreeze",
        "lr",
        "lr_decay",
        "channels_last",
        "num_workers",
        "crop_scale_min",
        "freeze_bn",
    }
)
# ``--augment auto`` leaves these None in ``resolve_defaults``; the run's probe decides them
# before the phases (``trainer.data.augment_policy``) and the decided values are what is recorded.
DECIDED_BY_PROBE = frozenset({"hflip", "vflip", "rotate90"})
# ``auto`` is how a user spells "decide from the data" for these; it is stored as unset.
AUTO = "auto"
AUTO_MEANS_UNSET: dict[str, Any] = {
    "init": "",
    "unfreeze": "",
    "lr": None,
    "lr_decay": None,
    "invert": None,
}
# The values of --init besides auto.
INIT_WEIGHTS, INIT_RANDOM = "weights", "random"
# What a number-or-auto setting expects, for the error that names it.
AUTO_NUMBERS = {
    "lr": "a positive number",
    "lr_decay": "a number in (0, 1]",
    "invert": "a number in [0, 1]",
}
# Errors name a flag by its flag (``--batch-size``) and a file's value by the file and the key.
LOADER = SettingsLoader(
    TrainConfig,
    env_prefix=ENV_PREFIX,
    file_source="{path}: {name}",
    flag_source="{flag}",
    words={name: {AUTO: unset} for name, unset in AUTO_MEANS_UNSET.items()},
    expand_home=True,
    text_from_scalars=True,
)


def field_help(name: str) -> str:
    """The documentation of a config field."""
    return str(FIELDS[name].metadata["help"])


def field_help_with_default(name: str) -> str:
    """The field's help, its choices and its default, as ``trainer train --help`` shows them.

    A default that depends on other settings is described in the help text itself and shown
    as ``(default: resolved at start)``; the resolved value is written to ``config.yaml``.
    """
    text = field_help(name)
    choices = field_choices(name)
    if choices:
        text += f" (choices: {', '.join(choices)})"
    default = FIELDS[name].default
    if name in ("data", "output"):
        text += " (required)"
    elif default is None or default == "":
        if name in AUTO_MEANS_UNSET:
            text += f" (default: {AUTO})"
        elif name in RESOLVED_AT_START:
            text += " (default: resolved at start)"
        elif name in DECIDED_BY_PROBE:
            text += " (default: decided by --augment)"
        elif "default" not in text:
            text += " (default: unset)"
    elif isinstance(default, bool):
        text += f" (default: {'on' if default else 'off'})"
    else:
        text += f" (default: {default})"
    return text.replace("%", "%%")


def field_choices(name: str) -> tuple[str, ...] | None:
    """Allowed values of a string field, if restricted."""
    choices = FIELDS[name].metadata.get("choices")
    return tuple(choices) if choices else None


def field_type(name: str) -> tuple[type, bool]:
    """The field's base type and whether it may be None."""
    kind = LOADER.types[name]
    return kind.base, kind.is_optional


def resolve_config(
    *,
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Merge defaults < YAML ``file`` < ``environ`` (``TRAINER_*``) < ``flags``; validate.

    Raises:
        ConfigError: unreadable file, unknown key, or bad value (the message names the key).
    """
    return build_config(given_settings(file=file, environ=environ, flags=flags))


def build_config(given: Mapping[str, Any]) -> TrainConfig:
    """The validated config of ``given`` settings (``given_settings``) over the defaults.

    Raises:
        ConfigError: a bad value (the message names the key).
    """
    config = TrainConfig(**given)
    validate(config)
    return config


def given_settings(
    *,
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings the user gave (file < environment < flags), converted; no defaults.

    A resumed run takes every setting missing here from its checkpoint (``trainer.resume``).

    Raises:
        ConfigError: unreadable file, unknown key, or bad value (the message names the key).
    """
    try:
        given = LOADER.read(
            file=file, environ=os.environ if environ is None else environ, flags=flags
        )
    except SettingError as error:
        raise _config_error(error) from None
    return {name: setting.value for name, setting in given.items()}


def convert(name: str, value: Any, source: str) -> Any:
    """Coerce ``value`` (a YAML value, an environment string or a flag) to the field's type.

    Args:
        source: where the value came from, as errors name it (``the checkpoint's config: lr``).

    Raises:
        ConfigError: naming ``source``.
    """
    try:
        return LOADER.convert(name, value, source)
    except SettingError as error:
        raise _config_error(error) from None


def _config_error(error: SettingError) -> ConfigError:
    """The trainer's wording of a settings error, naming the key and where it came from."""
    if isinstance(error, SettingsFileError):
        if error.problem == "not a mapping":
            reason = "expected a mapping of settings at the top level"
            return ConfigError(f"config file {error.path}: {reason}")
        if error.cause is not None:
            return ConfigError(f"config file {error.path}: {error.cause}")
    elif isinstance(error, UnknownSettingError):
        if error.origin == "file":
            unknown = ", ".join(sorted(error.names))
            return ConfigError(f"config file {error.path}: unknown key(s) {unknown}")
        if error.origin == "environment":
            field_name = error.names[0]
            return ConfigError(f"{error.keys[0]}: unknown setting (no config field {field_name!r})")
        return ConfigError(f"{error.keys[0]}: unknown setting")
    elif isinstance(error, SettingValueError):
        if error.is_missing:
            return ConfigError(f"{error.source}: a value is required")
        if error.name in AUTO_NUMBERS:
            expected = AUTO_NUMBERS[error.name]
            return ConfigError(f"{error.source}: expected {expected} or auto, got {error.value!r}")
        return ConfigError(f"{error.source}: {error.reason}")
    return ConfigError(str(error))


def validate(config: TrainConfig) -> None:
    """Check ranges and choices; raises ``ConfigError`` naming the first bad key."""
    for name in FIELDS:
        choices = field_choices(name)
        value = getattr(config, name)
        if choices and value not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    checks: list[tuple[str, bool, str]] = [
        ("data", config.data is not None, "is required (--data DIR)"),
        ("output", config.output is not None, "is required (--output DIR)"),
        (
            "image_size",
            config.image_size is None or config.image_size >= MIN_IMAGE_SIZE,
            f"must be at least {MIN_IMAGE_SIZE}",
        ),
        ("batch_size", config.batch_size >= 1, "must be at least 1"),
        ("head_epochs", config.head_epochs is None or config.head_epochs >= 0, "must be >= 0"),
        ("finetune_epochs", config.finetune_epochs >= 0, "must be >= 0"),
        ("val_fraction", 0.0 < config.val_fraction < 1.0, "must be between 0 and 1"),
        ("lr", config.lr is None or config.lr > 0, "must be positive"),
        ("head_lr", config.head_lr > 0, "must be positive"),
        ("lr_decay", config.lr_decay is None or 0.0 < config.lr_decay <= 1.0, "must be in (0, 1]"),
        ("warmup_fraction", 0.0 <= config.warmup_fraction < 1.0, "must be in [0, 1)"),
        ("weight_decay", config.weight_decay >= 0, "must be >= 0"),
        ("patience", config.patience >= 1, "must be at least 1"),
        ("grad_clip", config.grad_clip >= 0, "must be >= 0"),
        ("label_smoothing", 0.0 <= config.label_smoothing < 1.0, "must be in [0, 1)"),
        (
            "crop_scale_min",
            config.crop_scale_min is None or 0.0 < config.crop_scale_min <= 1.0,
            "must be in (0, 1]",
        ),
        ("feature_views", config.feature_views >= 1, "must be at least 1"),
        ("alignment_weight", config.alignment_weight >= 0, "must be >= 0"),
        ("forgetting_weight", config.forgetting_weight >= 0, "must be >= 0"),
        ("feature_cache_mb", config.feature_cache_mb >= 0, "must be >= 0"),
        ("rotation", config.rotation >= 0, "must be >= 0"),
        ("color_jitter", config.color_jitter >= 0, "must be >= 0"),
        ("random_erasing", 0.0 <= config.random_erasing <= 1.0, "must be in [0, 1]"),
        ("invert", config.invert is None or 0.0 <= config.invert <= 1.0, "must be in [0, 1]"),
        ("mixup_alpha", config.mixup_alpha >= 0, "must be >= 0"),
        ("cutmix_alpha", config.cutmix_alpha >= 0, "must be >= 0"),
        ("ema_decay", 0.0 < config.ema_decay < 1.0, "must be in (0, 1)"),
        ("stop_timeout", config.stop_timeout > 0, "must be positive"),
        ("cache_max_mb", config.cache_max_mb >= 0, "must be >= 0"),
        ("num_workers", config.num_workers is None or config.num_workers >= 0, "must be >= 0"),
        ("head_dropout", 0.0 <= config.head_dropout < 1.0, "must be in [0, 1)"),
        (
            "metrics_port",
            config.metrics_port is None or 0 <= config.metrics_port <= 65535,
            "must be a port number 0-65535",
        ),
        ("unfreeze", _is_unfreeze_policy(config.unfreeze), "must be top:K, all, gradual:N or auto"),
        ("init", config.init in ("", INIT_WEIGHTS, INIT_RANDOM), "must be weights, random or auto"),
        (
            "forgetting_guard",
            config.init != INIT_RANDOM or config.forgetting_guard in ("auto", "off"),
            "holds phase 2 near the --weights, but --init random does not start from them; "
            "use auto or off",
        ),
    ]
    for name, ok, message in checks:
        if not ok:
            value = getattr(config, name)
            raise ConfigError(f"{name}: {message}" + ("" if value is None else f", got {value!r}"))
    try:
        # The export publishes under this name: the same rule, checked before any training.
        validate_model_name(config.model_name)
    except InvalidModelName as exc:
        raise ConfigError(f"model_name: {exc}") from None


def check_output_directory(path: Path, setting: str) -> None:
    """Refuse a directory to write into that cannot be one: it, or a parent of it, is a file.

    Checked before the heavy imports and the work, so the mistake is reported in a second
    instead of as a traceback when the first file is written.

    Raises:
        ConfigError: naming ``setting`` (as the user spells it), the path and the file.
    """
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if existing.is_dir():
            return
        if existing == path:
            raise ConfigError(f"{setting}: {path} is a file, not a directory")
        raise ConfigError(f"{setting}: {path} cannot be created: {existing} is a file")


def _is_unfreeze_policy(policy: str) -> bool:
    if policy in ("", "all"):
        return True
    kind, _, count = policy.partition(":")
    return kind in ("top", "gradual") and count.isdigit() and int(count) >= 1


def trains_from_scratch(config: TrainConfig) -> bool:
    """``--weights none`` or ``--init random``: no pretrained features, so the defaults train
    everything."""
    return config.weights.strip().lower() == "none" or config.init == INIT_RANDOM


def resolve_defaults(
    config: TrainConfig,
    *,
    device_type: str,
    dataset_cached: bool,
    cpu_count: int,
    input_size: int | None = None,
) -> TrainConfig:
    """The config with every "default depends on other settings" field filled in.

    Pure: the same inputs give the same config. The result is what runs, and what
    ``config.yaml`` and the checkpoint record.

    Args:
        config: the config as the user gave it (unset fields are None or "").
        device_type: the training device's type (``cpu`` or ``cuda``).
        dataset_cached: whether the dataset is decoded once into memory.
        cpu_count: CPUs of this machine (DataLoader workers).
        input_size: the training crop in pixels (``image_size`` when unset, and the crop
            scale under ``--augment auto``).
            The flips and rotations ``--augment auto`` tests stay None here; the run fills
            them in from the probe (``augment_policy``).
    """
    scratch = trains_from_scratch(config)
    config = _resolve_augment(config, input_size)
    return dataclasses.replace(
        config,
        image_size=config.image_size if config.image_size is not None else input_size,
        head_epochs=config.head_epochs if config.head_epochs is not None else (0 if scratch else 2),
        # Left unset (auto) for a pretrained start: trainer.finetune.choice decides them from
        # the fitted head before phase 2, and the decided values are what is recorded.
        unfreeze=config.unfreeze or ("all" if scratch else ""),
        lr=config.lr if config.lr is not None else (config.head_lr if scratch else None),
        lr_decay=_resolve_lr_decay(config, scratch),
        freeze_bn=config.freeze_bn if config.freeze_bn is not None else not scratch,
        channels_last=(
            config.channels_last if config.channels_last is not None else device_type == "cuda"
        ),
        num_workers=(
            config.num_workers
            if config.num_workers is not None
            else (0 if dataset_cached else min(8, cpu_count))
        ),
    )


def _resolve_lr_decay(config: TrainConfig, scratch: bool) -> float | None:
    """Unset (searched with the policy, ``trainer.finetune.choice``) only where the policy is."""
    if config.lr_decay is not None:
        return config.lr_decay
    if scratch:
        return 1.0
    return None if not config.unfreeze else 0.3


def _resolve_augment(config: TrainConfig, input_size: int | None) -> TrainConfig:
    from trainer.augment_defaults import CANDIDATES, FIXED, FIXED_CROP_SCALE, crop_scale_for

    fixed: dict[str, Any]
    if config.augment == FIXED:
        fixed = {k: v for k, v in CANDIDATES.items() if getattr(config, k) is None}
        scale = FIXED_CROP_SCALE
    else:
        fixed = {}
        scale = crop_scale_for(input_size) if input_size else FIXED_CROP_SCALE
    if config.crop_scale_min is None:
        fixed["crop_scale_min"] = scale
    return dataclasses.replace(config, **fixed)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    text = "# Resolved training config (defaults < file < environment < flags)\n"
    text += yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_bytes(path, text.encode())
