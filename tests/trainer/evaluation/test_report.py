"""The end-of-training report: PNGs that decode, per-class scores that add up, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image
from trainer_helpers import tiny_config

from trainer.evaluation.report import _curves_figure, per_class_scores, read_metrics, write_report
from trainer.finetune.phases import warmup_cosine
from trainer.run import train

CLASSES = ["cat", "dog", "a rather long class name that would not fit on an axis"]
CONFUSION = np.array([[8, 1, 1], [2, 6, 0], [0, 0, 0]], dtype=np.int64)


def _write_metrics(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _two_phase_rows(lrs_as_list: bool = False) -> list[dict]:
    rows = []
    for global_epoch, (phase, epoch) in enumerate(
        [("head", 1), ("head", 2), ("finetune", 1), ("finetune", 2), ("finetune", 3)], start=1
    ):
        lrs = {"head": 1e-3 / global_epoch}
        if phase == "finetune":
            lrs["layer4"] = 1e-4 / global_epoch
        rows.append(
            {
                "phase": phase,
                "epoch": epoch,
                "global_epoch": global_epoch,
                "train_loss": 2.0 / global_epoch,
                "val_loss": 2.2 / global_epoch,
                "val_accuracy": 0.4 + 0.1 * global_epoch,
                "lrs": list(lrs.values()) if lrs_as_list else lrs,
                "images_per_second": 100.0 + global_epoch,
            }
        )
    return rows


def test_report_files(tmp_path):
    metrics = _write_metrics(tmp_path / "metrics.jsonl", _two_phase_rows())
    backend = matplotlib.get_backend()
    write_report(tmp_path / "report", metrics, CONFUSION, CLASSES)
    assert matplotlib.get_backend() == backend  # no backend switch in the caller

    for name in ("curves.png", "confusion_matrix.png"):
        with Image.open(tmp_path / "report" / name) as image:
            assert image.format == "PNG"
            assert image.width > 600 and image.height > 400
            # not a blank canvas: plotted lines and cells give many distinct colours
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    assert (tmp_path / "report" / "curves.png").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "confusion_matrix.png",
        "curves.png",
        "per_class.json",
    ]

    scores = json.loads((tmp_path / "report" / "per_class.json").read_text())
    assert scores["accuracy"] == pytest.approx(14 / 18)
    assert scores["total"] == 18
    assert list(scores["per_class"]) == CLASSES
    cat = scores["per_class"]["cat"]
    assert cat["precision"] == pytest.approx(8 / 10)
    assert cat["recall"] == pytest.approx(8 / 10)
    assert cat["support"] == 10
    dog = scores["per_class"]["dog"]
    assert dog["precision"] == pytest.approx(6 / 7)
    assert dog["recall"] == pytest.approx(6 / 8)
    assert dog["f1"] == pytest.approx(2 * (6 / 7) * (6 / 8) / (6 / 7 + 6 / 8))
    # a class with no validation images and one wrong prediction: zeros, never NaN
    assert scores["per_class"][CLASSES[2]] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
    }
    assert scores["weighted_avg"]["recall"] == pytest.approx(scores["accuracy"])


def test_learning_rates_as_dict_or_list(tmp_path):
    by_name = read_metrics(_write_metrics(tmp_path / "a.jsonl", _two_phase_rows()))
    assert set(by_name.lrs) == {"head", "layer4"}
    assert by_name.lrs["head"][0] == pytest.approx(1e-3)
    assert np.isnan(by_name.lrs["layer4"][0])  # layer4 had no group in the head phase
    assert by_name.lrs["layer4"][2] == pytest.approx(1e-4 / 3)

    positional = read_metrics(_write_metrics(tmp_path / "b.jsonl", _two_phase_rows(True)))
    assert set(positional.lrs) == {"head", "finetune group 0", "finetune group 1"}
    write_report(tmp_path / "report", tmp_path / "b.jsonl", CONFUSION, CLASSES)
    assert (tmp_path / "report" / "curves.png").stat().st_size > 10_000


def test_learning_rates_as_flat_keys(tmp_path):
    rows = _two_phase_rows()
    for row in rows:
        row.update({f"lr/{name}": lr for name, lr in row.pop("lrs").items()})
    history = read_metrics(_write_metrics(tmp_path / "m.jsonl", rows))
    assert set(history.lrs) == {"head", "layer4"}
    rows[0]["lrs"] = "fast"
    with pytest.raises(ValueError, match="lrs must be a dict or a list"):
        read_metrics(_write_metrics(tmp_path / "m.jsonl", rows))


def test_resumed_epoch_keeps_the_last_line(tmp_path):
    rows = _two_phase_rows()
    rerun = dict(rows[2], train_loss=0.123)
    history = read_metrics(_write_metrics(tmp_path / "m.jsonl", [*rows[:4], rerun, rows[4]]))
    assert history.global_epoch == [1, 2, 3, 4, 5]
    assert history.train_loss[2] == pytest.approx(0.123)
    assert history.phase == ["head", "head", "finetune", "finetune", "finetune"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no epoch records"),
        ("{not json\n", r"m\.jsonl:1: not valid JSON"),
        ('{"phase": "head"}\n', r"m\.jsonl:1: missing key\(s\) global_epoch"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_bad_metrics_file(tmp_path, content, message):
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path / "report", tmp_path / "m.jsonl", CONFUSION, CLASSES)
    assert not (tmp_path / "report").exists()


def test_missing_metrics_file(tmp_path):
    with pytest.raises(ValueError, match="metrics file not found"):
        write_report(tmp_path / "report", tmp_path / "none.jsonl", CONFUSION, CLASSES)


@pytest.mark.parametrize(
    ("confusion", "message"),
    [
        (np.zeros((3, 2), dtype=np.int64), "square"),
        (np.zeros((2, 2), dtype=np.int64), "3 class names"),
        (np.zeros((3, 3), dtype=np.float32), "integer counts"),
        (-np.ones((3, 3), dtype=np.int64), "negative"),
    ],
)
def test_bad_confusion_matrix(tmp_path, confusion, message):
    metrics = _write_metrics(tmp_path / "m.jsonl", _two_phase_rows())
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path / "report", metrics, confusion, CLASSES)


def test_scores_of_an_empty_matrix_are_zero():
    scores = per_class_scores(np.zeros((2, 2), dtype=np.int64), ["a", "b"])
    assert scores["accuracy"] == 0.0
    assert scores["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def _with_step_lrs(rows: list[dict], steps_per_epoch: int = 10) -> list[dict]:
    """The rows as the trainer now writes them: each group's LR at listed steps of the epoch."""
    lr_steps = [0, 3, 6, 9]
    for row in rows:
        row["steps_per_epoch"] = steps_per_epoch
        row["lr_steps"] = lr_steps
        row["step_lrs"] = {
            name: [lr * (j + 1) / steps_per_epoch for j in lr_steps]
            for name, lr in row["lrs"].items()
        }
    return rows


def test_learning_rates_per_step(tmp_path):
    rows = _with_step_lrs(_two_phase_rows())
    history = read_metrics(_write_metrics(tmp_path / "m.jsonl", rows))
    assert history.has_step_lrs
    head = history.lr_curves["head"]
    assert head.step_points == 4 * 5
    assert head.epoch_points == []
    # step j of 10 in global epoch 1 lies inside the epoch's band [0.5, 1.5]
    assert head.x[:4] == pytest.approx([0.55, 0.85, 1.15, 1.45])
    assert head.y[:4] == pytest.approx([1e-4, 4e-4, 7e-4, 1e-3])
    layer4 = history.lr_curves["layer4"]
    assert layer4.x[0] == pytest.approx(2.55)  # trained from the finetune phase on
    assert history.lrs["head"][0] == pytest.approx(1e-3)  # the per-epoch column stays
    write_report(tmp_path / "report", tmp_path / "m.jsonl", CONFUSION, CLASSES)
    assert (tmp_path / "report" / "curves.png").stat().st_size > 10_000


def test_old_records_without_step_lrs_fall_back_to_epochs(tmp_path):
    # A run resumed by a newer trainer: old lines per epoch, new lines per step.
    rows = _two_phase_rows()
    rows[2:] = _with_step_lrs(rows[2:])
    history = read_metrics(_write_metrics(tmp_path / "m.jsonl", rows))
    head = history.lr_curves["head"]
    assert head.epoch_points == [0, 1]
    assert head.x[:2] == [1.0, 2.0]
    assert head.step_points == 4 * 3
    assert not read_metrics(_write_metrics(tmp_path / "old.jsonl", _two_phase_rows())).has_step_lrs
    write_report(tmp_path / "report", tmp_path / "m.jsonl", CONFUSION, CLASSES)


def test_a_group_missing_from_an_epoch_breaks_its_line(tmp_path):
    rows = _two_phase_rows()
    rows[3]["lrs"].pop("layer4")
    history = read_metrics(_write_metrics(tmp_path / "m.jsonl", _with_step_lrs(rows)))
    layer4 = history.lr_curves["layer4"]
    assert layer4.step_points == 4 * 2
    assert sum(np.isnan(layer4.y)) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps_per_epoch": 0}, r"m\.jsonl:2: steps_per_epoch must be a positive integer"),
        ({"lr_steps": [0, 3, 6, 10]}, r"m\.jsonl:2: lr_steps must list step indices"),
        ({"step_lrs": [1e-3]}, r"m\.jsonl:2: step_lrs must be a dict"),
        ({"step_lrs": {"head": [1e-3]}}, r"m\.jsonl:2: step_lrs\['head'\] must list 4"),
        ({"step_lrs": {"head": ["x"] * 4}}, r"m\.jsonl:2: step_lrs\['head'\]: expected a number"),
    ],
)
def test_bad_step_lrs_name_the_line(tmp_path, change, message):
    rows = _with_step_lrs(_two_phase_rows())
    rows[1].update(change)
    with pytest.raises(ValueError, match=message):
        read_metrics(_write_metrics(tmp_path / "m.jsonl", rows))


def test_accuracy_axis_is_fixed_with_chance_level(tmp_path):
    # A run wandering around chance must not fill the axis like steady progress.
    rows = [dict(row, val_accuracy=0.18 + 0.01 * i) for i, row in enumerate(_two_phase_rows())]
    history = read_metrics(_write_metrics(tmp_path / "m.jsonl", rows))
    figure = _curves_figure(history, num_classes=5)
    accuracy_axis = figure.axes[1]
    assert accuracy_axis.get_ylim() == (0.0, 1.0)
    chance = [line for line in accuracy_axis.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1
    assert chance[0].get_label() == "chance (1/5 = 20.0%)"
    assert chance[0].get_linestyle() == "--"
    assert list(chance[0].get_ydata()) == [0.2, 0.2]
    assert "per optimizer step" not in figure.axes[2].get_title()
    stepped_rows = _with_step_lrs(_two_phase_rows())
    stepped = _curves_figure(
        read_metrics(_write_metrics(tmp_path / "s.jsonl", stepped_rows)), num_classes=5
    )
    assert stepped.axes[2].get_title().endswith("per optimizer step")


@pytest.mark.slow
def test_a_real_run_records_the_lr_of_each_step(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path / "out", finetune_epochs=2, batch_size=4)
    train(config)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    per_epoch = records[0]["steps_per_epoch"]
    assert per_epoch == 6  # 3 classes x 8 training images, 4 a batch
    factor = warmup_cosine(2 * per_epoch, config.warmup_fraction)
    for record in records:
        assert record["lr_steps"] == list(range(per_epoch))
        assert set(record["step_lrs"]) == set(record["lrs"])
        first = (record["epoch"] - 1) * per_epoch
        for group, rates in record["step_lrs"].items():
            # "lrs" is the optimizer's LR after the epoch's last step: the same schedule
            base = record["lrs"][group] / factor(record["epoch"] * per_epoch)
            assert rates == pytest.approx([base * factor(first + j) for j in range(per_epoch)])
    assert records[0]["step_lrs"]["head"][0] < records[0]["step_lrs"]["head"][2]  # warmup
    history = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert history.lr_curves["head"].step_points == 2 * per_epoch
    assert (tmp_path / "out" / "report" / "curves.png").is_file()
