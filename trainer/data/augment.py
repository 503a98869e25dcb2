"""Augmentation (torchvision.transforms.v2 on uint8 tensors) and batch preparation.

Per-image transforms run on uint8 [3, H, W] tensors in the data pipeline. The float
conversion, normalisation, memory format and MixUp/CutMix happen per batch on the training
device, where they are cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from contracts.preprocessing import Preprocessing


@dataclass(frozen=True)
class AugmentSettings:
    """Which augmentations run on training images (each can be switched off)."""

    random_resized_crop: bool = True
    crop_scale_min: float = 0.25
    hflip: bool = True
    vflip: bool = False
    rotate90: bool = False
    rotation: float = 0.0
    color_jitter: float = 0.0
    auto_augment: str = "none"
    random_erasing: float = 0.0
    invert: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


def _off(default: Any) -> Any:
    """The "off" value of a setting whose default is ``default``: 0.0 for a probability or
    strength, False for a switch."""
    return 0.0 if isinstance(default, float) else False


def augment_settings(values: Mapping[str, Any]) -> AugmentSettings:
    """The settings from config values; a transform not decided yet (None) is off."""
    chosen: dict[str, Any] = {
        f.name: values[f.name] if values[f.name] is not None else _off(f.default)
        for f in dataclasses.fields(AugmentSettings)
    }
    return AugmentSettings(**chosen)


class RandomRotate90(nn.Module):
    """Rotate a square [..., H, W] image by 0, 90, 180 or 270 degrees, uniformly."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(0, 4, ()).item())
        return torch.rot90(image, k=turns, dims=(-2, -1)) if turns else image


def train_transform(pre: Preprocessing, aug: AugmentSettings) -> v2.Compose:
    """uint8 image -> augmented uint8 crop of ``pre.input_size``."""
    steps: list[nn.Module] = []
    if aug.random_resized_crop:
        steps.append(
            v2.RandomResizedCrop(pre.input_size, scale=(aug.crop_scale_min, 1.0), antialias=True)
        )
    else:
        steps += [v2.Resize(pre.resize_size, antialias=True), v2.RandomCrop(pre.input_size)]
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.vflip:
        steps.append(v2.RandomVerticalFlip())
    if aug.rotate90:
        steps.append(RandomRotate90())
    if aug.rotation > 0:
        steps.append(v2.RandomRotation(aug.rotation))
    if aug.color_jitter > 0:
        s = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    if aug.auto_augment == "trivial":
        steps.append(v2.TrivialAugmentWide())
    elif aug.auto_augment == "rand":
        steps.append(v2.RandAugment())
    if aug.invert > 0:
        steps.append(v2.RandomInvert(p=aug.invert))
    if aug.random_erasing > 0:
        steps.append(v2.RandomErasing(p=aug.random_erasing, value=0))
    return v2.Compose(steps)


def eval_transform(pre: Preprocessing) -> v2.Compose:
    """uint8 image -> resize (shorter side) + centre crop, as the exported model expects."""
    return v2.Compose([v2.Resize(pre.resize_size, antialias=True), v2.CenterCrop(pre.input_size)])


class BatchPreparer:
    """uint8 NCHW batch on any device -> normalised float batch in the chosen memory format."""

    def __init__(self, pre: Preprocessing, device: torch.device, channels_last: bool) -> None:
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255.0
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format)
        return (images.float() - self.mean) / self.std


def batch_mixer(
    aug: AugmentSettings, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """MixUp and/or CutMix on float batches (one of them per batch), or None when both off."""
    choices: list[nn.Module] = []
    if aug.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
    if aug.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    mixer = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def mix(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, soft = mixer(images, labels)
        return mixed, soft

    return mix
