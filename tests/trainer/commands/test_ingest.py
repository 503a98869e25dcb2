"""trainer ingest: labelled captures move into the training set atomically, once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.cli import main
from trainer.commands.ingest import LEDGER, ingest
from trainer.errors import DataError


def _image(path: Path, seed: int, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    for label in ("cat", "dog"):
        _image(data / "train" / label / "0.png", seed=hash(label) % 1000)
    captures = tmp_path / "captures"
    for i, predicted in enumerate(("cat", "dog", "cat")):
        image = _image(captures / "unlabeled" / predicted / f"c{i}.png", seed=100 + i)
        sidecar = {"model": "m", "version": "3", "probabilities": {"cat": 0.55}}
        image.with_suffix(".png.json").write_text(json.dumps(sidecar))
    return data, captures


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_labelled_captures_move_into_their_class_with_provenance(layout, tmp_path) -> None:
    data, captures = layout
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nunlabeled/cat/c0.png,dog\nunlabeled/dog/c1.png,dog\n")
    report = ingest(captures, labels, data)
    assert report.added == {"dog": 2}
    assert len(_files(data / "train" / "dog")) == 3
    assert _files(data / "train" / "cat") == ["0.png"]
    assert not (captures / "unlabeled/cat/c0.png").exists()
    assert not (captures / "unlabeled/cat/c0.png.json").exists()
    assert (captures / "unlabeled/cat/c2.png").exists()  # not in the CSV: untouched
    records = [json.loads(line) for line in (data / LEDGER).read_text().splitlines()]
    assert {r["label"] for r in records} == {"dog"}
    assert records[0]["capture"]["version"] == "3"
    assert (data / records[0]["path"]).is_file()


def test_a_capture_with_a_missing_or_malformed_sidecar_is_ingested_without_provenance(
    layout, tmp_path
) -> None:
    data, captures = layout
    (captures / "unlabeled/cat/c0.png.json").write_text('{"model": 3}')
    (captures / "unlabeled/dog/c1.png.json").unlink()
    labels = tmp_path / "labels.csv"
    labels.write_text("unlabeled/cat/c0.png,cat\nunlabeled/dog/c1.png,dog\n")
    assert ingest(captures, labels, data).added == {"cat": 1, "dog": 1}
    records = [json.loads(line) for line in (data / LEDGER).read_text().splitlines()]
    assert [r["capture"] for r in records] == [None, None]
    assert not (captures / "unlabeled/cat/c0.png.json").exists()


def test_rerun_after_a_crash_is_idempotent(layout, tmp_path) -> None:
    data, captures = layout
    source = captures / "unlabeled/cat/c0.png"
    kept = source.read_bytes()
    labels = tmp_path / "labels.csv"
    labels.write_text("unlabeled/cat/c0.png,cat\n")
    assert ingest(captures, labels, data).added == {"cat": 1}
    source.write_bytes(kept)  # as if the process died between the copy and the delete
    report = ingest(captures, labels, data)
    assert (report.added, report.already_present) == ({}, 1)
    assert len(_files(data / "train" / "cat")) == 2
    assert not source.exists()


def test_the_same_image_labelled_differently_is_kept_as_it_was(layout, tmp_path) -> None:
    data, captures = layout
    source = captures / "unlabeled/cat/c0.png"
    kept = source.read_bytes()
    first = tmp_path / "first.csv"
    first.write_text("unlabeled/cat/c0.png,cat\n")
    ingest(captures, first, data)
    source.write_bytes(kept)
    second = tmp_path / "second.csv"
    second.write_text("unlabeled/cat/c0.png,dog\n")
    report = ingest(captures, second, data)
    assert report.added == {} and len(report.conflicts) == 1
    assert "labelled 'cat' before" in report.conflicts[0]
    assert len(_files(data / "train" / "dog")) == 1


def test_bad_rows_are_refused_by_line_and_nothing_moves(layout, tmp_path) -> None:
    data, captures = layout
    (captures / "notes.txt").write_text("not an image")
    (captures / "fake.png").write_bytes(b"not a png")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "unlabeled/cat/c0.png,cat\n"  # 1: fine
        "missing.png,cat\n"  # 2: unknown path
        "unlabeled/dog/c1.png,horse\n"  # 3: unknown class
        "unlabeled/cat/c0.png,dog\n"  # 4: duplicate of line 1
        "../data/train/cat/0.png,cat\n"  # 5: outside the capture directory
        "notes.txt,cat\n"  # 6: not an image
        "fake.png,cat\n"  # 7: not a readable image
        "a,b,c\n"  # 8: three fields
    )
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(DataError) as error:
        ingest(captures, labels, data)
    message = str(error.value)
    assert "7 bad row(s)" in message
    for expected in (
        "line 2: no capture",
        "line 3: unknown class 'horse'",
        "line 4: duplicate of line 1",
        "line 5:",
        "line 6:",
        "line 7:",
        "line 8: expected 'path,label'",
    ):
        assert expected in message
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_new_classes_need_the_flag(layout, tmp_path) -> None:
    data, captures = layout
    labels = tmp_path / "labels.csv"
    labels.write_text("unlabeled/dog/c1.png,fox\n")
    with pytest.raises(DataError, match="unknown class 'fox'"):
        ingest(captures, labels, data)
    assert ingest(captures, labels, data, allow_new=True).added == {"fox": 1}
    assert len(_files(data / "train" / "fox")) == 1


def test_cli_exit_codes(layout, tmp_path, capsys) -> None:
    data, captures = layout
    labels = tmp_path / "labels.csv"
    labels.write_text("unlabeled/dog/c1.png,horse\n")
    args = ["ingest", "--captures", str(captures), "--labels", str(labels), "--data", str(data)]
    assert main(args) == 2
    assert "line 1: unknown class 'horse'" in capsys.readouterr().err
    labels.write_text("unlabeled/dog/c1.png,dog\n")
    assert main(args) == 0
    assert "added 1 image(s) (dog 1)" in capsys.readouterr().out


def _many_captures(captures: Path, count: int) -> str:
    rows = ["path,label"]
    for i in range(count):
        label = ("cat", "dog")[i % 2]
        _image(captures / "unlabeled" / label / f"m{i}.png", seed=500 + i)
        rows.append(f"unlabeled/{label}/m{i}.png,{label}")
    return "\n".join(rows) + "\n"


def test_a_holdout_share_goes_to_holdout_by_content_hash(layout, tmp_path) -> None:
    data, captures = layout
    labels = tmp_path / "labels.csv"
    labels.write_text(_many_captures(captures, 40))
    keep = {p: p.read_bytes() for p in (captures / "unlabeled").rglob("m*.png")}
    report = ingest(captures, labels, data, holdout_share=0.3)
    held = sorted(p.read_bytes() for p in (data / "holdout").rglob("*.png"))
    trained = [p for p in (data / "train").rglob("ingested-*.png")]
    assert sum(report.added.values()) == 40 == len(held) + len(trained)
    assert sum(report.held_out.values()) == len(held)
    assert 4 <= len(held) <= 20  # about 12 of 40 (the hash decides, not a count)
    assert "of them to holdout/" in report.describe()
    # The same rows in another order on a fresh copy split the same way.
    fresh = tmp_path / "fresh"
    for label in ("cat", "dog"):
        _image(fresh / "train" / label / "0.png", seed=hash(label) % 1000)
    for path, payload in keep.items():
        path.write_bytes(payload)
    header, *rows = labels.read_text().splitlines()
    labels.write_text("\n".join([header, *reversed(rows)]) + "\n")
    ingest(captures, labels, fresh, holdout_share=0.3)
    assert sorted(p.read_bytes() for p in (fresh / "holdout").rglob("*.png")) == held


def test_the_split_and_share_are_checked(layout, tmp_path, capsys) -> None:
    data, captures = layout
    labels = tmp_path / "labels.csv"
    labels.write_text("unlabeled/dog/c1.png,dog\n")
    with pytest.raises(DataError, match="split 'test' is not one of train, val, holdout"):
        ingest(captures, labels, data, split="test")
    with pytest.raises(DataError, match=r"holdout share 1\.5 must be between 0 and 1"):
        ingest(captures, labels, data, holdout_share=1.5)
    with pytest.raises(DataError, match="val is not a directory"):
        ingest(captures, labels, data, split="val")
    with pytest.raises(DataError, match="new classes can only be added to train/"):
        ingest(captures, labels, data, split="holdout", allow_new=True)
    # Holdout takes train's classes and is created when needed.
    args = ["ingest", "--captures", str(captures), "--labels", str(labels), "--data", str(data)]
    assert main([*args, "--split", "holdout"]) == 0
    assert len(_files(data / "holdout" / "dog")) == 1
