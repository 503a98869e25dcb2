"""A model barely better than guessing is named as such: at the end of its run, when it is the
source of a fine-tune, and when it is exported."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from trainer_helpers import make_image_folder, tiny_config

from trainer.evaluation.chance import near_chance_limit, near_chance_warning
from trainer.model.weights import resolve_weights
from trainer.run import train


@pytest.mark.parametrize(("classes", "limit"), [(2, 0.625), (5, 0.4), (10, 0.325)])
def test_near_chance_is_a_quarter_of_the_way_from_chance_to_perfect(classes, limit) -> None:
    assert near_chance_limit(classes) == pytest.approx(limit)


def test_the_warning_names_the_accuracy_and_chance() -> None:
    warning = near_chance_warning("the source", 0.24, 5)
    assert warning is not None
    assert "0.240 val accuracy on 5 classes (chance 0.200, near-chance below 0.400)" in warning
    assert near_chance_warning("the source", 0.41, 5) is None
    assert near_chance_warning("the source", -1.0, 5) is None  # never evaluated: unknown


@pytest.mark.slow
def test_a_near_chance_source_checkpoint_is_warned_about(tmp_path: Path, caplog) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), train_per_class=4)
    train(tiny_config(data, tmp_path / "run"))
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    document = torch.load(best, weights_only=True)
    for accuracy, warned in ((0.55, True), (0.9, False)):
        document["best_val_accuracy"] = accuracy
        torch.save(document, best)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            resolve_weights("resnet18", str(best))
        assert ("reached only 0.550 val accuracy on 2 classes" in caplog.text) == warned
