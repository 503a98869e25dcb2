"""A folder without ``val/``, or with an unreadable val file, trains and exports to the end.

Training holds out a seeded share of ``train/`` when there is no ``val/`` and skips files it
cannot decode; the export at the end of ``trainer train`` must read the same split by the same
rule, or a finished run fails at its last step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import make_image_folder, tiny_train_args

from contracts.golden_set import GOLDEN_DIRNAME
from contracts.repository_layout import METADATA_FILENAME
from trainer.cli import main


def _train_and_export(data: Path, output: Path) -> dict:
    code = main(tiny_train_args(data, output, batch_size=8, extra=("--finetune-epochs", "1")))
    assert code == 0
    version = output / "model_repository" / "classifier" / "1"
    return json.loads((version / METADATA_FILENAME).read_text())


@pytest.mark.slow
def test_a_train_only_folder_exports_with_its_seeded_val_split(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", train_per_class=10, val_per_class=None)
    metadata = _train_and_export(data, tmp_path / "out")
    # val_fraction 0.2 of 10 per class: the 2 images per class training held out.
    assert metadata["val_class_counts"] == [2, 2, 2]
    assert metadata["golden_set"]["images"] >= 6  # the held-out images, plus a rotated one
    assert "threshold" in metadata["abstention"]
    golden = tmp_path / "out" / "model_repository" / "classifier" / "1" / GOLDEN_DIRNAME
    assert golden.is_dir()


@pytest.mark.slow
def test_an_unreadable_val_file_is_skipped_by_the_export_too(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", train_per_class=6, val_per_class=3)
    (data / "val" / "circle" / "empty.png").write_bytes(b"")
    metadata = _train_and_export(data, tmp_path / "out")
    assert metadata["golden_set"]["images"] >= 9
    assert "threshold" in metadata["abstention"]
