"""The holdout set's reader refuses what is malformed or over its bounds, naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts import holdout_set
from contracts.holdout_set import (
    HOLDOUT_DIRNAME,
    HOLDOUT_FILENAME,
    HOLDOUT_FORMAT,
    HoldoutImage,
    HoldoutSet,
    InvalidHoldoutSet,
    read_holdout_set,
)


def _write(version: Path, document: object, files: dict[str, bytes] | None = None) -> None:
    folder = version / HOLDOUT_DIRNAME
    folder.mkdir(parents=True)
    (folder / HOLDOUT_FILENAME).write_text(json.dumps(document))
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)


def test_what_is_written_reads_back(tmp_path: Path) -> None:
    written = HoldoutSet(("cat", "dog"), (HoldoutImage("a.png", 1), HoldoutImage("b.jpg", 0)))
    _write(tmp_path, written.to_dict(), {"a.png": b"A", "b.jpg": b"B"})
    assert read_holdout_set(tmp_path) == (written, [b"A", b"B"])
    assert read_holdout_set(tmp_path / "elsewhere") is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"format": "x"}, "holdout set format 'x'"),
        ({"format": HOLDOUT_FORMAT, "labels": "cat", "images": []}, "labels must be a list"),
        (
            {
                "format": HOLDOUT_FORMAT,
                "labels": ["a"],
                "images": [{"file": "../x", "true_label": 0}],
            },
            "must be a plain file name",
        ),
        (
            {"format": HOLDOUT_FORMAT, "labels": ["a"], "images": [{"file": "x", "true_label": 1}]},
            "true_label 1 is not a class index",
        ),
        (
            {
                "format": HOLDOUT_FORMAT,
                "labels": ["a"],
                "images": [{"file": "x", "true_label": True}],
            },
            "is not a class index",
        ),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_malformed_documents_are_refused(tmp_path: Path, document: object, message: str) -> None:
    _write(tmp_path, document)
    with pytest.raises(InvalidHoldoutSet, match=message.replace("(", r"\(")):
        read_holdout_set(tmp_path)


def test_bounds_are_checked_before_reading(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(holdout_set, "MAX_HOLDOUT_IMAGES", 1)
    images = [{"file": f"{i}.png", "true_label": 0} for i in range(2)]
    _write(tmp_path / "many", {"format": HOLDOUT_FORMAT, "labels": ["a"], "images": images})
    with pytest.raises(InvalidHoldoutSet, match="lists 2 images, more than 1"):
        read_holdout_set(tmp_path / "many")
    monkeypatch.setattr(holdout_set, "MAX_HOLDOUT_IMAGE_BYTES", 3)
    document = {"format": HOLDOUT_FORMAT, "labels": ["a"], "images": images[:1]}
    _write(tmp_path / "large", document, {"0.png": b"four"})
    with pytest.raises(InvalidHoldoutSet, match="4 bytes, more than 3"):
        read_holdout_set(tmp_path / "large")
    _write(tmp_path / "missing", document)
    with pytest.raises(InvalidHoldoutSet, match=r"0\.png"):
        read_holdout_set(tmp_path / "missing")
