"""A capture's sidecar: one name rule and one format for the server and ``trainer ingest``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.capture_files import (
    MAX_SIDECAR_BYTES,
    CaptureRecord,
    InvalidCaptureSidecar,
    read_sidecar,
    sidecar_path,
)

# What the server of the previous release wrote beside a re-encoded capture.
PREVIOUS_RELEASE = (
    '{"model": "classifier", "probabilities": {"cat": 0.55, "dog": 0.45}, "reason": '
    '"low_margin", "received_at": 1767225600.25, "reencoded_from_bytes": 3145728, '
    '"request_id": "req-1", "version": "3"}'
)


def test_the_sidecar_is_the_image_s_name_plus_json() -> None:
    assert sidecar_path(Path("c/unlabeled/cat/x.png")) == Path("c/unlabeled/cat/x.png.json")
    assert sidecar_path(Path("a.b.jpg")).name == "a.b.jpg.json"
    assert sidecar_path(Path("bare")).name == "bare.json"


def test_the_previous_release_s_sidecar_reads_and_writes_back_the_same_bytes(
    tmp_path: Path,
) -> None:
    image = tmp_path / "x.jpg"
    sidecar_path(image).write_text(PREVIOUS_RELEASE)
    record = read_sidecar(image)
    assert record == CaptureRecord(
        model="classifier",
        version="3",
        probabilities={"cat": 0.55, "dog": 0.45},
        request_id="req-1",
        reason="low_margin",
        received_at=1767225600.25,
        reencoded_from_bytes=3145728,
    )
    assert record.to_json_bytes() == PREVIOUS_RELEASE.encode()


def test_optional_keys_stay_absent_and_unknown_ones_are_kept(tmp_path: Path) -> None:
    document = {"model": "m", "version": "3", "probabilities": {"cat": 0.55}, "tool": "x"}
    image = tmp_path / "c0.png"
    sidecar_path(image).write_text(json.dumps(document))
    assert read_sidecar(image).to_dict() == document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"version": "3", "probabilities": {}}, "model must be a string"),
        ({"model": "m", "version": 3, "probabilities": {}}, "version must be a string"),
        ({"model": "m", "version": "3", "probabilities": [0.5]}, "probabilities must map"),
        ({"model": "m", "version": "3", "probabilities": {"a": "x"}}, "probabilities must map"),
        (
            {"model": "m", "version": "3", "probabilities": {}, "received_at": "noon"},
            "received_at must be a number",
        ),
        (
            {"model": "m", "version": "3", "probabilities": {}, "reencoded_from_bytes": -1},
            "reencoded_from_bytes must be a whole number",
        ),
    ],
)
def test_a_malformed_sidecar_names_the_key(tmp_path: Path, document: dict, message: str) -> None:
    image = tmp_path / "c0.png"
    sidecar_path(image).write_text(json.dumps(document))
    with pytest.raises(InvalidCaptureSidecar, match=message):
        read_sidecar(image)


def test_a_missing_or_oversized_sidecar_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "c0.png"
    with pytest.raises(InvalidCaptureSidecar, match=r"c0\.png\.json"):
        read_sidecar(image)
    with sidecar_path(image).open("wb") as handle:
        handle.truncate(MAX_SIDECAR_BYTES + 1)
    with pytest.raises(InvalidCaptureSidecar, match="larger than"):
        read_sidecar(image)
