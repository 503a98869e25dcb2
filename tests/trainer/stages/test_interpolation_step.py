"""A real run scores mixes of phase 2's start and end on val and keeps one only when it beats
the best epoch; the record is in summary.json and best.pt, and best.pt holds that mix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from trainer_helpers import make_image_folder, tiny_config

from trainer import checkpoint as ckpt
from trainer.finetune.weight_interpolation import MIXES, interpolate_states
from trainer.job.process_setup import DistInfo
from trainer.run import build_training_parts, set_up, train
from trainer.stages.interpolation import interpolate_best


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("interpolation")
    return make_image_folder(root / "data", classes=("a", "b", "c"), train_per_class=6)


def test_the_mixes_are_scored_and_the_decision_follows_the_scores(
    data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    summary = train(
        tiny_config(
            data, out, head_epochs=1, finetune_epochs=2, calibrate="off", weight_interpolation="on"
        )
    )
    record = summary["weight_interpolation"]
    assert [row["mix"] for row in record["mixes"]] == list(MIXES)
    top = max(row["val_accuracy"] for row in record["mixes"])
    before = record["best_val_accuracy_before"]
    assert (record["kept_mix"] is not None) == (top > before)
    assert summary["best_val_accuracy"] == pytest.approx(max(top, before))
    checkpoints = out / "checkpoints"
    best = ckpt.load_checkpoint(checkpoints / "best.pt")
    assert best.interpolation == record
    if record["kept_mix"] is not None:
        start, _ = ckpt.load_checkpoint(checkpoints / "phase2-start.pt").best_state
        end, _ = ckpt.load_checkpoint(checkpoints / "last.pt").best_state
        expected = interpolate_states(start, end, record["kept_mix"])
        state, _ = best.best_state
        assert all(torch.equal(state[name], expected[name]) for name in expected)


def test_off_and_runs_without_a_head_phase_record_none(data: Path, tmp_path: Path) -> None:
    off = train(tiny_config(data, tmp_path / "off", head_epochs=1, calibrate="off"))
    assert off["weight_interpolation"] is None  # off by default, and nothing kept for it
    assert not (tmp_path / "off" / "checkpoints" / "phase2-start.pt").exists()
    # From scratch there is no head-phase model to mix with.
    scratch = train(
        tiny_config(data, tmp_path / "scratch", calibrate="off", weight_interpolation="on")
    )
    assert scratch["weight_interpolation"] is None
    assert not (tmp_path / "scratch" / "checkpoints" / "phase2-start.pt").exists()


def test_a_mix_that_beats_the_best_epoch_replaces_it(data: Path, tmp_path: Path) -> None:
    finished = tmp_path / "run"
    train(
        tiny_config(
            data,
            finished,
            head_epochs=1,
            finetune_epochs=2,
            calibrate="off",
            weight_interpolation="on",
        )
    )
    checkpoints = finished / "checkpoints"
    # Planted: a best epoch every mix beats, and no record yet.
    best = ckpt.load_checkpoint(checkpoints / "best.pt")
    best.progress.best_val_accuracy = -1.0
    planted = dataclasses.replace(best, interpolation=None)
    (checkpoints / "best.pt").write_bytes(ckpt.serialize(planted))
    config = tiny_config(
        data, tmp_path / "stage", head_epochs=1, finetune_epochs=2, weight_interpolation="on"
    )
    setup = set_up(config, None, DistInfo(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    parts, _ = build_training_parts(setup)
    context = dataclasses.replace(setup.context, checkpoints=checkpoints)
    progress = ckpt.Progress()

    record = interpolate_best(context, parts, progress)

    assert record is not None
    top = max(record["mixes"], key=lambda row: (row["val_accuracy"], -row["val_loss"]))
    assert record["kept_mix"] == top["mix"] and record["reason"].startswith(f"mix {top['mix']}")
    assert progress.best_val_accuracy == top["val_accuracy"]
    kept = ckpt.load_checkpoint(checkpoints / "best.pt")
    assert kept.interpolation == record and kept.progress.best_val_accuracy == top["val_accuracy"]
    start, _ = ckpt.load_checkpoint(checkpoints / "phase2-start.pt").best_state
    end, _ = ckpt.load_checkpoint(checkpoints / "last.pt").best_state
    expected = interpolate_states(start, end, top["mix"])
    state, _ = kept.best_state
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    # A second pass (a re-run completing the run's end) keeps what is recorded.
    assert interpolate_best(context, parts, ckpt.Progress()) == record
