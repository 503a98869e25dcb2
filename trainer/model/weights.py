"""Starting weights (torchvision enum, ``none``, or a file) and the preprocessing they imply.

Torchvision weights are read from torchvision's cache (``$TORCH_HOME/hub/checkpoints``) and
downloaded there only when missing, so an image with the weights baked in needs no egress.
When they cannot be obtained the trainer stops with ``WeightsUnavailable`` (exit 2): it never
falls back to random weights on its own.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tv_models

from contracts.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from trainer.checkpoint import Checkpoint, UnsafeCheckpoint, is_checkpoint_dict, read_torch_file
from trainer.config import MIN_IMAGE_SIZE
from trainer.errors import CheckpointError, ConfigError, WeightsUnavailable
from trainer.evaluation.chance import warn_if_near_chance
from trainer.model.classifier import classifier_path, plain_state_dict

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224
CROP_FRACTION = 0.875
DOWNLOAD_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class StartingWeights:
    """Resolved ``--weights``: where they came from, the tensors, and preprocessing hints."""

    source: str
    state_dict: dict[str, torch.Tensor] | None
    preprocessing: Preprocessing | None
    # A trainer checkpoint's stored Fisher information (``forgetting.FisherInformation``).
    fisher: dict[str, Any] | None = None


def resolve_weights(arch: str, spec: str) -> StartingWeights:
    """Turn ``--weights`` (``DEFAULT``, an enum name, ``none`` or a PATH) into tensors.

    Raises:
        WeightsUnavailable: torchvision weights neither cached nor downloadable, or the path
            does not exist or is unreadable.
        ConfigError: unknown weights name, or a trainer checkpoint of another architecture.
    """
    if spec.lower() == "none":
        return StartingWeights("none", None, None)
    path = Path(spec).expanduser()
    if names_a_file(spec):
        return _from_file(arch, path)
    weights = _torchvision_enum(arch, spec)
    state = _load_torchvision_state(arch, weights)
    return StartingWeights(spec, state, _from_transforms(weights))


def names_a_file(spec: str) -> bool:
    """Whether ``--weights spec`` is a PATH (an existing file, or spelled like one) rather
    than ``none`` or a torchvision weights name."""
    if spec.lower() == "none":
        return False
    return Path(spec).expanduser().exists() or _looks_like_path(spec)


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith((".pt", ".pth", ".bin", ".ckpt"))


def _torchvision_enum(arch: str, spec: str) -> tv_models.WeightsEnum:
    try:
        enum = tv_models.get_model_weights(arch)
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            f"weights: {arch} has no torchvision weights; use --weights none or a PATH"
        ) from exc
    name = spec.rsplit(".", maxsplit=1)[-1]
    try:
        return enum[name] if name != "DEFAULT" else enum.DEFAULT  # type: ignore[misc]
    except KeyError:
        choices = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ConfigError(
            f"weights: {spec!r} is not a weights name of {arch} (choose one of {choices}, "
            "'none', or a path to a state dict or trainer checkpoint)"
        ) from None


def torchvision_cache_file(weights: tv_models.WeightsEnum) -> Path:
    """Where torchvision keeps (or would download) these weights: under ``TORCH_HOME``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _load_torchvision_state(arch: str, weights: tv_models.WeightsEnum) -> dict[str, torch.Tensor]:
    cached = torchvision_cache_file(weights)
    if cached.is_file():
        log.info("loading %s weights from the cache %s", weights, cached)
        return torch.load(cached, map_location="cpu", weights_only=True)
    log.info("%s not in the cache %s; downloading %s", weights, cached, weights.url)
    previous = socket.getdefaulttimeout()
    # urllib has no timeout of its own: a cluster without egress would hang here for minutes.
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        raise WeightsUnavailable(_unavailable_message(arch, weights, cached, exc)) from exc
    finally:
        socket.setdefaulttimeout(previous)


def _unavailable_message(
    arch: str, weights: tv_models.WeightsEnum, cached: Path, exc: BaseException
) -> str:
    return (
        f"cannot obtain the pretrained weights {weights} for {arch}: they are not in the "
        f"torchvision cache ({cached}) and the download from {weights.url} failed "
        f"({type(exc).__name__}: {exc}). Bake them into the image (build the trainer image "
        f"with --build-arg WEIGHTS={arch}, or put {cached.name} under $TORCH_HOME/hub/"
        "checkpoints/ and set TORCH_HOME), or pass --weights PATH to a state dict or a trainer "
        "checkpoint, or --weights none to train from scratch on purpose."
    )


def _from_transforms(weights: tv_models.WeightsEnum) -> Preprocessing | None:
    transforms = weights.transforms()
    crop = getattr(transforms, "crop_size", None)
    resize = getattr(transforms, "resize_size", None)
    mean = getattr(transforms, "mean", None)
    std = getattr(transforms, "std", None)
    if not (crop and resize and mean and std):
        return None
    return Preprocessing((int(crop[0]), int(crop[-1])), int(resize[0]), _triple(mean), _triple(std))


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def _from_file(arch: str, path: Path) -> StartingWeights:
    if not path.is_file():
        raise WeightsUnavailable(
            f"weights: {path} does not exist; pass a state dict or a trainer checkpoint, "
            "DEFAULT, a torchvision weights name, or none"
        )
    # The same safe loader as resume and export: a crafted pickle is refused, never run.
    try:
        obj = read_torch_file(path)
    except UnsafeCheckpoint:
        raise
    except CheckpointError as exc:
        raise ConfigError(f"{_not_weights(path)} (torch.load cannot read it)") from exc
    if is_checkpoint_dict(obj):
        checkpoint = Checkpoint.from_dict(obj, path)
        if checkpoint.header.arch != arch:
            raise ConfigError(
                f"weights: {path} is a {checkpoint.header.arch} checkpoint but --arch is {arch}"
            )
        warn_if_near_chance(
            log,
            f"weights: the source checkpoint {path}",
            checkpoint.progress.best_val_accuracy,
            checkpoint.header.num_classes,
        )
        # EMA weights are the ones the run kept as its best model (and exported).
        state, _ = checkpoint.best_state
        return StartingWeights(
            str(path),
            _plain_state(state, path),
            checkpoint.header.preprocessing,
            checkpoint.fisher,
        )
    for key in ("state_dict", "model_state", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    return StartingWeights(str(path), _plain_state(obj, path), None)


def _plain_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{_not_weights(path)} (it holds no mapping of names to tensors)")
    return plain_state_dict(dict(obj))


def _not_weights(path: Path) -> str:
    return f"weights: {path} is not a checkpoint of this trainer or a state dict"


def load_starting_weights(model: nn.Module, weights: StartingWeights) -> list[str]:
    """Load ``weights`` into ``model``; returns the source head keys dropped (if any).

    The source's head is dropped when its shapes differ from the new head (another class
    count or head layout): the new head keeps its random initialisation. Any other missing,
    unexpected or mis-shaped tensor is an error.

    Raises:
        ConfigError: the weights do not fit the architecture outside the head.
    """
    if weights.state_dict is None:
        return []
    source = dict(weights.state_dict)
    target = model.state_dict()
    head = classifier_path(model) + "."
    source_head = {k for k in source if k.startswith(head)}
    target_head = {k for k in target if k.startswith(head)}
    head_fits = source_head == target_head and all(
        source[k].shape == target[k].shape for k in target_head
    )
    dropped = [] if head_fits else sorted(source_head)
    for key in dropped:
        del source[key]
    missing = [k for k in target if k not in source and not (k in target_head and not head_fits)]
    unexpected = [k for k in source if k not in target]
    mis_shaped = [
        f"{k} {tuple(source[k].shape)} vs {tuple(target[k].shape)}"
        for k in source
        if k in target and source[k].shape != target[k].shape
    ]
    if missing or unexpected or mis_shaped:
        raise ConfigError(
            f"weights: {weights.source} does not fit {type(model).__name__}: "
            + "; ".join(
                f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for label, items in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("shape mismatch", mis_shaped),
                )
                if items
            )
        )
    merged = {**target, **source}
    model.load_state_dict(merged)
    if dropped:
        log.info("dropped the source head (%s): its shape differs from the new head", dropped)
    return dropped


def preprocessing_for(weights: StartingWeights, image_size: int | None) -> Preprocessing:
    """Preprocessing from the weights' metadata, the crop size overridden by ``image_size``.

    Without metadata: ImageNet mean/std, 224 px, resize = size / 0.875. With an override the
    weights' resize/crop ratio is kept.
    """
    base = weights.preprocessing or Preprocessing(
        (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE),
        round(DEFAULT_IMAGE_SIZE / CROP_FRACTION),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    if image_size is None:
        return base
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    ratio = base.resize_size / base.input_size[0]
    return Preprocessing((image_size, image_size), round(image_size * ratio), base.mean, base.std)
