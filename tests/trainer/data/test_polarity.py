"""Contrast polarity: the inversion probability read from the labelled and unlabelled images,
the transform that applies it, and a real run that decides, records and applies it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from trainer_helpers import tiny_config

from contracts.preprocessing import Preprocessing
from trainer import checkpoint as ckpt
from trainer.data.augment import AugmentSettings, augment_settings, train_transform
from trainer.data.polarity import bright_centre, bright_centre_share, choose_inversion
from trainer.run import train


def _figure(bright: bool, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A uint8 [3, H, W] image: a square figure in the middle, bright on dark or dark on
    bright, with some noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (3, size, size)).astype(np.uint8)
    quarter = size // 4
    pixels[:, quarter : size - quarter, quarter : size - quarter] += 180
    image = torch.from_numpy(pixels)
    return image if bright else 255 - image


def test_an_image_is_bright_centred_when_its_middle_outshines_its_border() -> None:
    assert bright_centre(_figure(bright=True))
    assert not bright_centre(_figure(bright=False))
    # Not square, any size: the regions are shares of each side.
    assert bright_centre(_figure(bright=True, size=48)[:, :, 4:44])


def _images(bright: int, dark: int) -> list[torch.Tensor]:
    return [_figure(True, seed=i) for i in range(bright)] + [
        _figure(False, seed=100 + i) for i in range(dark)
    ]


def test_inversion_matches_the_labelled_polarity_to_the_unlabelled_images() -> None:
    lab = _images(200, 0)
    # Half the field images dark-centred: invert half the labelled ones.
    half = choose_inversion(lab, _images(100, 100))
    assert (half.probability, half.source) == (0.5, "polarity")
    assert (half.labelled_share, half.unlabeled_share) == (1.0, 0.5)
    # A quarter: invert a quarter.
    assert choose_inversion(lab, _images(150, 50)).probability == 0.25
    # All dark-centred: inversion can only reach one half, so one half is the closest.
    assert choose_inversion(lab, _images(0, 200)).probability == 0.5
    assert bright_centre_share(_images(30, 10)) == 0.75


def test_inversion_stays_off_where_it_cannot_help_or_the_difference_is_noise() -> None:
    # The same polarity in both folders.
    assert choose_inversion(_images(200, 0), _images(200, 0)).probability == 0.0
    # Mixed polarity in both (natural photographs): nothing to match.
    assert choose_inversion(_images(100, 100), _images(110, 90)).probability == 0.0
    # Labelled mixed, unlabelled one-sided: inversion only moves toward one half.
    assert choose_inversion(_images(100, 100), _images(200, 0)).probability == 0.0
    # A difference of one image in ten is within two standard errors of ten-image samples.
    noisy = choose_inversion(_images(10, 0), _images(9, 1))
    assert noisy.probability == 0.0 and noisy.margin is not None and noisy.margin >= 0.1


def test_the_transform_inverts_with_the_probability_and_unset_means_off() -> None:
    pre = Preprocessing(input_size=(16, 16), resize_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    plain = AugmentSettings(random_resized_crop=False, hflip=False)
    image = torch.full((3, 16, 16), 40, dtype=torch.uint8)
    assert torch.equal(train_transform(pre, plain)(image), image)
    inverted = train_transform(
        pre, AugmentSettings(random_resized_crop=False, hflip=False, invert=1.0)
    )
    assert torch.equal(inverted(image), torch.full((3, 16, 16), 215, dtype=torch.uint8))
    defaults = {name: None for name in AugmentSettings.__dataclass_fields__}
    assert augment_settings(defaults).invert == 0.0


def _write(folder: Path, images: list[torch.Tensor], stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{stem}-{i}.png")


@pytest.mark.slow
def test_a_run_with_unlabelled_images_of_the_other_polarity_inverts_and_records_it(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    for split, count in (("train", 6), ("val", 2)):
        for label in ("a", "b"):
            seeds = range(count) if label == "a" else range(50, 50 + count)
            _write(data / split / label, [_figure(True, seed=s) for s in seeds], label)
    field = tmp_path / "field"
    _write(field, [_figure(False, seed=200 + i) for i in range(8)], "capture")
    summary = train(
        tiny_config(
            data, tmp_path / "out", finetune_epochs=1, calibrate="off", unlabeled_data=field
        )
    )
    invert = summary["augment"]["invert"]
    assert invert["probability"] == 0.5 and invert["source"] == "polarity"
    assert invert["labelled_bright_centre_share"] == 1.0
    assert invert["unlabeled_bright_centre_share"] == 0.0
    assert invert["labelled_images"] == 12 and invert["unlabeled_images"] == 8
    recorded = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert recorded["invert"] == 0.5
    best = ckpt.load_checkpoint(tmp_path / "out" / "checkpoints" / "best.pt")
    assert best.adaptation is not None and best.adaptation["polarity_inversion"] == invert
    # Given, it is the user's: no measuring.
    given = train(
        tiny_config(
            data,
            tmp_path / "given",
            finetune_epochs=1,
            calibrate="off",
            unlabeled_data=field,
            invert=0.0,
        )
    )
    assert given["augment"]["invert"] == {"probability": 0.0, "source": "setting"}
