"""SIGTERM in any stage of a run (not only inside the phases' steps): the run stops, says where,
exits cleanly, and ``--resume auto`` then finishes it."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
from trainer_helpers import make_image_folder, tiny_config

from trainer import checkpoint as ckpt
from trainer.run import train


class _SigtermAt(logging.Handler):
    """Sends this process a real SIGTERM at the first record with the event (or message)."""

    def __init__(self, event: str | None = None, message: str | None = None) -> None:
        super().__init__(logging.INFO)
        self.event, self.message, self.fired = event, message, False

    def emit(self, record: logging.LogRecord) -> None:
        if self.fired:
            return
        is_event = (
            self.event is not None and getattr(record, "structured_event", None) == self.event
        )
        is_message = self.message is not None and self.message in record.getMessage()
        if is_event or is_message:
            self.fired = True
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def source_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stop")
    source_data = make_image_folder(root / "source", train_per_class=8, val_per_class=3)
    train(tiny_config(source_data, root / "source-run", finetune_epochs=1, batch_size=8))
    # No val/: the data scan logs its seeded hold-out, the first sign of the run.
    # Four classes over three tints: the probe is not perfect, so phase 2's choice runs.
    target = make_image_folder(
        root / "target", classes=("a", "b", "c", "d"), train_per_class=12, val_per_class=None
    )
    return root / "source-run" / "checkpoints" / "best.pt", target


def _run(source: Path, data: Path, output: Path, trigger: _SigtermAt | None = None) -> dict:
    config = tiny_config(
        data,
        output,
        weights=str(source),
        head_epochs=1,
        finetune_epochs=1,
        batch_size=8,
        export=True,
    )
    root = logging.getLogger()
    if trigger is not None:
        root.addHandler(trigger)
    try:
        return train(config)
    finally:
        if trigger is not None:
            root.removeHandler(trigger)


# Resuming is checked once per kind of stop (the cost of a whole run each): with no checkpoint
# yet (the run starts again) and with training done (the run's end is completed).
@pytest.mark.slow
@pytest.mark.parametrize(
    ("trigger", "stage", "has_checkpoint", "resumes"),
    [
        (_SigtermAt(message="no val/ folder: held out"), "the data scan and set-up", False, False),
        (_SigtermAt(event="linear_probe"), "the head phase and phase 2's choice", False, False),
        (_SigtermAt(event="lr_range_test"), "the head phase and phase 2's choice", False, False),
        (_SigtermAt(event="finetune_trial"), "the head phase and phase 2's choice", False, True),
        (_SigtermAt(event="calibrated"), "calibration", True, False),
        (_SigtermAt(event="export_step"), "the report and export", True, True),
    ],
    ids=["data-scan", "head-phase", "range-test", "trials", "calibration", "export"],
)
def test_sigterm_in_a_stage_stops_there_and_resume_finishes(  # noqa: PLR0913  fixtures
    source_and_data: tuple[Path, Path],
    tmp_path: Path,
    caplog,
    trigger: _SigtermAt,
    stage: str,
    has_checkpoint: bool,
    resumes: bool,
) -> None:
    source, data = source_and_data
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        stopped = _run(source, data, output, trigger)
    assert trigger.fired
    assert stopped["status"] == "interrupted" and stopped["stage"] == stage, stopped
    assert f"stopped during {stage}" in caplog.text
    assert (stopped["checkpoint"] is not None) == has_checkpoint
    assert not (output / "summary.json").exists()
    assert not (output / "model_repository").exists()  # nothing half published
    if not resumes:
        return
    finished = _run(source, data, output)
    assert finished["status"] == "completed", finished
    summary = json.loads((output / "summary.json").read_text())
    assert summary["model_version"] == 1
    assert (output / "checkpoints" / ckpt.BEST).is_file()
