"""``--class-balance``: inverse-frequency loss weights when the classes are imbalanced."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import make_image_folder, tiny_config

from trainer.data.class_balance import class_balance
from trainer.run import train


def test_weights_only_when_imbalanced() -> None:
    balanced = class_balance([0, 0, 1, 1, 1], 2, "auto")
    assert balanced.weights is None and balanced.ratio == 1.5
    skewed = class_balance([0] * 9 + [1] * 3, 2, "auto")
    assert skewed.ratio == 3.0
    assert skewed.weights == pytest.approx((12 / 18, 12 / 6))
    assert class_balance([0] * 9 + [1] * 3, 2, "off").weights is None


def test_run_reports_the_balance(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), train_per_class=6)
    for extra in sorted((data / "train" / "b").iterdir())[2:]:
        extra.unlink()  # 6 images of a, 2 of b
    summary = train(tiny_config(data, tmp_path / "run", head_epochs=1, feature_views=1))
    assert summary["class_balance"]["counts"] == [6, 2]
    assert summary["class_balance"]["weighted"] is True
    assert summary["class_balance"]["weights"] == pytest.approx([8 / 12, 8 / 4], abs=1e-3)
