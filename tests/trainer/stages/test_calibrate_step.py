"""After training the best model's temperature is fitted on val and recorded (or skipped)."""

from __future__ import annotations

import json
from pathlib import Path

from trainer_helpers import tiny_config

from trainer.checkpoint import load_checkpoint
from trainer.run import train


def test_run_records_the_temperature_in_best_pt_summary_and_report(
    image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    summary = train(tiny_config(image_folder, out, head_epochs=1, feature_views=1))
    calibration = summary["calibration"]
    assert calibration["split"] == "val" and calibration["count"] == 9
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9
    assert (
        load_checkpoint(out / "checkpoints" / "best.pt").temperature == (calibration["temperature"])
    )
    assert json.loads((out / "report" / "calibration.json").read_text()) == calibration


def test_calibrate_off_skips_it(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(tiny_config(image_folder, out, head_epochs=1, calibrate="off"))
    assert summary["calibration"] is None
    assert load_checkpoint(out / "checkpoints" / "best.pt").calibration is None
