"""``--augment``: the crop-scale rule, the noise margin, the fixed mode and bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.augment_defaults import crop_scale_for
from trainer.cli import main
from trainer.config import resolve_config, resolve_defaults
from trainer.data.augment import AugmentSettings, RandomRotate90, augment_settings
from trainer.data.augment_policy import assess_transform, decide, noise_margin

REQUIRED = {"data": "d", "output": "o"}


def test_crop_scale_from_the_image_size() -> None:
    assert crop_scale_for(32) == crop_scale_for(64) == 0.6
    assert crop_scale_for(224) == crop_scale_for(160) == 0.25
    assert 0.25 < crop_scale_for(112) < 0.6


def test_auto_resolves_crop_scale_and_leaves_flips_to_the_probe() -> None:
    config = resolve_config(environ={}, flags=REQUIRED)
    resolved = resolve_defaults(
        config, device_type="cpu", dataset_cached=True, cpu_count=2, input_size=48
    )
    assert resolved.crop_scale_min == 0.6
    assert (resolved.hflip, resolved.vflip, resolved.rotate90) == (None, None, None)


def test_fixed_mode_and_explicit_flags() -> None:
    config = resolve_config(environ={}, flags={**REQUIRED, "augment": "fixed", "vflip": True})
    resolved = resolve_defaults(
        config, device_type="cpu", dataset_cached=True, cpu_count=2, input_size=48
    )
    assert resolved.crop_scale_min == 0.25
    assert (resolved.hflip, resolved.vflip, resolved.rotate90) == (True, True, False)
    explicit = resolve_config(environ={}, flags={**REQUIRED, "crop_scale_min": "0.9"})
    assert (
        resolve_defaults(
            explicit, device_type="cpu", dataset_cached=True, cpu_count=2, input_size=48
        ).crop_scale_min
        == 0.9
    )


def test_bad_augment_value_is_a_usage_error_naming_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--augment", "sometimes"])  # fmt: skip
    assert code == 2
    assert "augment: expected one of auto, fixed" in capsys.readouterr().err


def test_undecided_transforms_are_off_in_the_settings() -> None:
    values = {**AugmentSettings().__dict__, "hflip": None, "vflip": None, "rotate90": True}
    settings = augment_settings(values)
    assert (settings.hflip, settings.vflip, settings.rotate90) == (False, False, True)


def test_rotate90_keeps_the_image() -> None:
    image = torch.arange(16, dtype=torch.uint8).view(1, 4, 4)
    torch.manual_seed(0)
    seen = {tuple(RandomRotate90()(image).flatten().tolist()) for _ in range(40)}
    assert len(seen) == 4
    assert all(sorted(s) == list(range(16)) for s in seen)


def test_margin_and_decisions() -> None:
    assert noise_margin(0.9, 100) == pytest.approx(0.06)
    assert noise_margin(1.0, 50) == pytest.approx(0.02)
    labels = torch.tensor([0, 1] * 50)
    plain = torch.nn.functional.one_hot(labels, 2).float()

    def identity(x: torch.Tensor) -> torch.Tensor:
        return x

    swapped = plain.flip(1)
    assert not assess_transform("hflip", identity, plain, swapped, labels).enabled
    assert assess_transform("hflip", identity, plain, plain, labels).enabled
    decisions = decide({"hflip": None, "vflip": True, "rotate90": None}, None, None, {})
    assert decisions["hflip"].source == "untested" and decisions["hflip"].enabled
    assert decisions["vflip"].source == "flag" and decisions["vflip"].enabled
    assert decisions["rotate90"].enabled is False
