"""The checkpoint schema and its one loader: no file runs code, whichever entry point reads it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny_train_args

from contracts.model_metadata import TemperatureCalibration
from contracts.preprocessing import Preprocessing
from trainer import checkpoint as ckpt
from trainer.cli import main
from trainer.errors import CheckpointError


class _Payload:
    """Unpickling this would create ``marker``: proof the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted(path: Path, marker: Path, *, looks_like_checkpoint: bool = True) -> Path:
    """A file shaped like a trainer checkpoint whose pickle would create ``marker``."""
    document: dict = {"model_state": {"w": torch.zeros(1)}, "payload": _Payload(marker)}
    if looks_like_checkpoint:
        document |= {"format": ckpt.CHECKPOINT_FORMAT, "format_version": ckpt.FORMAT_VERSION}
    buffer = io.BytesIO()
    torch.save(document, buffer)
    path.write_bytes(buffer.getvalue())
    return path


def _header() -> ckpt.CheckpointHeader:
    return ckpt.CheckpointHeader(
        arch="resnet18",
        classes=("a", "b"),
        head=ckpt.HeadSpec(hidden=8, dropout=0.1),
        preprocessing=Preprocessing((32, 32), 37),
        weights="none",
        dataset_fingerprint={"classes": ["a", "b"], "file_count": 4},
        config={"arch": "resnet18", "head_epochs": 0},
    )


def test_schema_round_trips_through_the_file(tmp_path: Path) -> None:
    progress = ckpt.Progress(global_epoch=3, best_val_accuracy=0.75, epochs_since_best=1)
    progress.stats["finetune"] = ckpt.PhaseStats(epochs=3, images=12, train_seconds=1.5)
    written = ckpt.Checkpoint(
        _header(),
        ckpt.Position(ckpt.PHASE_ORDER["finetune"], 3, ckpt.EPOCH_DONE),
        progress,
        model_state={"w": torch.ones(2)},
        training=ckpt.TrainingState(optimizer={"state": {}, "param_groups": []}),
    )
    ckpt.save(tmp_path, ckpt.serialize(written), best=False)
    read = ckpt.load_checkpoint(tmp_path / ckpt.LAST)
    assert read.header == written.header
    assert read.position == written.position
    assert read.progress.to_dict() == written.progress.to_dict()
    assert read.to_dict()["epochs"] == {"head": 0, "finetune": 3}
    assert torch.equal(read.model_state["w"], torch.ones(2))


def test_adaptation_and_fisher_round_trip_and_older_files_without_them_load(tmp_path: Path):
    written = ckpt.Checkpoint(
        _header(),
        ckpt.Position(ckpt.PHASE_ORDER["finetune"], 1, ckpt.EPOCH_DONE),
        ckpt.Progress(),
        model_state={"w": torch.ones(2)},
        adaptation={"adabn": {"kept": True}},
        fisher={"diagonal": {"w": torch.full((2,), 0.5)}, "images": 4},
    )
    ckpt.save(tmp_path, ckpt.serialize(written), best=False)
    read = ckpt.load_checkpoint(tmp_path / ckpt.LAST)
    assert read.adaptation == {"adabn": {"kept": True}}
    assert read.fisher is not None and torch.equal(
        read.fisher["diagonal"]["w"], torch.full((2,), 0.5)
    )
    older = written.to_dict()
    del older["adaptation"], older["fisher"]
    torch.save(older, tmp_path / "older.pt")
    read = ckpt.load_checkpoint(tmp_path / "older.pt")
    assert read.adaptation is None and read.fisher is None


def test_calibration_is_typed_and_older_records_load(tmp_path: Path) -> None:
    written = ckpt.Checkpoint(
        _header(),
        ckpt.Position(ckpt.PHASE_ORDER["finetune"], 1, ckpt.EPOCH_DONE),
        ckpt.Progress(),
        model_state={"w": torch.ones(2)},
        calibration=TemperatureCalibration(1.5, 0.08, 0.02, 0.31, 0.24, 9, 15),
    )
    # The file holds a plain dict, so the weights-only loader needs no allow-listed type.
    assert written.to_dict()["calibration"] == {
        "temperature": 1.5,
        "ece_before": 0.08,
        "ece_after": 0.02,
        "nll_before": 0.31,
        "nll_after": 0.24,
        "count": 9,
        "ece_bins": 15,
    }
    ckpt.save(tmp_path, ckpt.serialize(written), best=False)
    read = ckpt.load_checkpoint(tmp_path / ckpt.LAST)
    assert read.calibration == written.calibration and read.temperature == 1.5
    for older, temperature in (({"temperature": 2.0, "ece_before": 0.1}, 2.0), ({}, 1.0)):
        document = written.to_dict() | {"calibration": older}
        torch.save(document, tmp_path / "older.pt")
        assert ckpt.load_checkpoint(tmp_path / "older.pt").temperature == temperature
    torch.save(written.to_dict() | {"calibration": None}, tmp_path / "none.pt")
    read = ckpt.load_checkpoint(tmp_path / "none.pt")
    assert read.calibration is None and read.temperature == 1.0
    torch.save(written.to_dict() | {"calibration": {"temperature": -1.0}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: calibration\.temperature -1\.0"):
        ckpt.load_checkpoint(tmp_path / "bad.pt")


def test_unsafe_file_is_refused_naming_file_and_global(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / "crafted.pt", marker)
    with pytest.raises(ckpt.UnsafeCheckpoint) as error:
        ckpt.load_checkpoint(path)
    assert str(path) in str(error.value)
    assert "open" in str(error.value)
    assert isinstance(error.value, CheckpointError)
    assert not marker.exists()


def test_export_refuses_a_crafted_checkpoint(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / "crafted.pt", marker)
    code = main(["export", "--checkpoint", str(path), "--output-repository", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "refusing to load" in err and str(path) in err
    assert not marker.exists()
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("looks_like_checkpoint", [True, False])
def test_weights_path_refuses_a_crafted_file(
    image_folder: Path, tmp_path: Path, capsys, looks_like_checkpoint: bool
) -> None:
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / "crafted.pt", marker, looks_like_checkpoint=looks_like_checkpoint)
    args = tiny_train_args(image_folder, tmp_path / "out", batch_size=4)
    code = main([*args, "--weights", str(path), "--no-export"])
    err = capsys.readouterr().err
    assert code == 2
    assert "refusing to load" in err and str(path) in err
    assert not marker.exists()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_path_refuses_a_crafted_checkpoint(
    image_folder: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / "crafted.pt", marker)
    args = tiny_train_args(image_folder, tmp_path / "out", batch_size=4)
    code = main([*args, "--resume", str(path), "--no-export"])
    err = capsys.readouterr().err
    assert code == 2
    assert "resume:" in err and "refusing to load" in err and str(path) in err
    assert not marker.exists()


def test_resume_auto_stops_on_a_crafted_checkpoint_instead_of_skipping_it(
    image_folder: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "marker"
    output = tmp_path / "out"
    (output / "checkpoints").mkdir(parents=True)
    _crafted(output / "checkpoints" / ckpt.LAST, marker)
    code = main([*tiny_train_args(image_folder, output, batch_size=4), "--no-export"])
    assert code == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_truncated_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "short.pt"
    path.write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt.load_checkpoint(path)
