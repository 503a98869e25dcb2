"""A resumed run takes its settings from the checkpoint: meaning-changing changes are refused
with old and new values, safe ones accepted and logged, a finished run is not trained again,
and config.yaml holds what ran."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from trainer_helpers import make_image_folder, tiny_config

from trainer import checkpoint as ckpt
from trainer.cli import main
from trainer.config import FIELDS
from trainer.run import train
from trainer.stages.resume import MEANING_CHANGING, SAFE_TO_CHANGE, THIS_RUN_ONLY


def test_every_setting_is_classified_once() -> None:
    lists = (MEANING_CHANGING, SAFE_TO_CHANGE, THIS_RUN_ONLY)
    assert set().union(*lists) == set(FIELDS)
    assert sum(len(names) for names in lists) == len(FIELDS)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished 2-epoch run (no export) and its data; the tests leave it as it is."""
    root = tmp_path_factory.mktemp("finished")
    data = make_image_folder(root / "data", classes=("a", "b"), train_per_class=4)
    output = root / "out"
    config = tiny_config(data, output, finetune_epochs=2, patience=5, num_workers=0)
    assert train(config)["status"] == "completed"
    return data, output


def _args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--output", str(output), *extra]


@pytest.mark.slow
def test_meaning_changing_settings_are_refused_in_one_message(
    finished_run: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    _, output = finished_run
    other_data = make_image_folder(tmp_path / "abc", classes=("a", "b", "c"), train_per_class=2)
    before = (output / "config.yaml").read_bytes()
    changes = ("--image-size", "48", "--finetune-epochs", "3", "--batch-size", "2")
    code = main(_args(other_data, output, *changes, "--unfreeze", "top:1", "--patience", "9"))
    err = capsys.readouterr().err
    assert code == 2
    message = [line for line in err.splitlines() if line.startswith("trainer: error:")]
    assert len(message) == 1, err
    for change in (
        "image_size: 32 -> 48",
        "finetune_epochs: 2 -> 3",
        "batch_size: 4 -> 2",
        "unfreeze: 'all' -> 'top:1'",
        "classes: ['a', 'b'] -> ['a', 'b', 'c']",
    ):
        assert change in message[0], message[0]
    # Safe changes are not named among the refused ones.
    assert "patience" not in message[0] and "data:" not in message[0]
    assert (output / "config.yaml").read_bytes() == before


@pytest.mark.slow
def test_finished_run_rerun_with_fewer_flags_trains_nothing(
    finished_run: tuple[Path, Path], caplog
) -> None:
    data, output = finished_run
    kept = {name: (output / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    with caplog.at_level(logging.INFO):
        code = main(_args(data, output, "--patience", "9"))
    assert code == 0
    assert "nothing to train" in caplog.text
    assert "patience: 5 -> 9" in caplog.text
    assert not (output / "model_repository").exists()  # --no-export of the first run holds
    for name, content in kept.items():
        assert (output / name).read_bytes() == content, name


@pytest.mark.slow
@pytest.mark.parametrize("change", ["added", "resized"])
def test_other_data_in_the_same_output_is_refused_in_one_line(
    finished_run: tuple[Path, Path], tmp_path: Path, capsys, change: str
) -> None:
    data, output = finished_run
    other = tmp_path / "other"
    shutil.copytree(data, other)
    first = sorted((other / "train" / "a").iterdir())[0]
    if change == "added":
        shutil.copy(first, first.with_name("extra" + first.suffix))
    else:
        first.write_bytes(first.read_bytes() + b"\0" * 16)
    before = (output / "config.yaml").read_bytes()
    code = main(_args(other, output))
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2
    assert len(lines) == 1, lines
    assert f"trainer: error: resume: {other} is not the data the checkpoint" in lines[0]
    assert "--resume never" in lines[0]
    assert (output / "config.yaml").read_bytes() == before


@pytest.mark.slow
def test_the_same_data_moved_elsewhere_resumes(
    finished_run: tuple[Path, Path], tmp_path: Path, caplog
) -> None:
    data, output = finished_run
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    with caplog.at_level(logging.INFO):
        assert main(_args(moved, output)) == 0
    assert "nothing to train" in caplog.text


@pytest.mark.slow
def test_resume_with_fewer_flags_continues_with_the_checkpoints_settings(
    finished_run: tuple[Path, Path], tmp_path: Path, caplog
) -> None:
    data, output = finished_run
    # The checkpoint a stop after epoch 1 of 2 leaves behind.
    done = ckpt.load_checkpoint(output / "checkpoints" / ckpt.LAST)
    after_epoch_1 = dataclasses.replace(
        done,
        position=ckpt.Position(ckpt.PHASE_ORDER["finetune"], 1, ckpt.EPOCH_DONE),
        progress=dataclasses.replace(done.progress, global_epoch=1),
    )
    stopped = tmp_path / "stopped.pt"
    stopped.write_bytes(ckpt.serialize(after_epoch_1))
    resumed = tmp_path / "resumed"
    with caplog.at_level(logging.INFO):
        safe = ("--patience", "7", "--stop-timeout", "30")
        code = main(_args(data, resumed, "--resume", str(stopped), *safe))
    assert code == 0
    assert "patience: 5 -> 7; stop_timeout: 20.0 -> 30.0" in caplog.text
    ran = yaml.safe_load((resumed / "config.yaml").read_text())
    recorded = yaml.safe_load((output / "config.yaml").read_text())
    assert ran["patience"] == 7 and ran["stop_timeout"] == 30.0
    assert ran["resume"] == str(stopped) and ran["output"] == str(resumed)
    for name in ("export", "finetune_epochs", "image_size", "weights", "batch_size", "lr"):
        assert ran[name] == recorded[name], name
    assert ran["export"] is False and ran["image_size"] == 32 and ran["weights"] == "none"
    metrics = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [m["global_epoch"] for m in metrics] == [2]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["global_epochs"] == 2 and summary["model_version"] is None
    assert not (resumed / "model_repository").exists()
