"""Capture for review: bounded in size and rate, never failing the request that offers it."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from server.capture import Capture, CapturePolicy, CaptureWriter, capture_reason
from server.errors import ConfigError


def _png(seed: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (seed % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


class Counts:
    """Thread-safe tallies of the writer's callbacks, with a way to wait for them."""

    def __init__(self) -> None:
        self.captured: list[str] = []
        self.dropped: list[str] = []
        self._changed = threading.Condition()

    def capture(self, reason: str) -> None:
        with self._changed:
            self.captured.append(reason)
            self._changed.notify_all()

    def drop(self, cause: str) -> None:
        with self._changed:
            self.dropped.append(cause)
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 30.0) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, timeout), (self.captured, self.dropped)


def _writer(directory: Path, counts: Counts, **policy) -> CaptureWriter:
    return CaptureWriter(directory, CapturePolicy(**policy), counts.capture, counts.drop)


def _capture(seed: int, scores: dict[str, float] | None = None) -> Capture:
    scores = scores or {"cat": 0.55, "dog/../x": 0.45}
    return Capture(_png(seed), "m", "3", scores, f"req-{seed}", "low_margin")


def test_reasons() -> None:
    policy = CapturePolicy(margin=0.2, random_share=0.1)
    assert capture_reason([0.9, 0.1], True, policy, lambda: 1.0) == "abstained"
    assert capture_reason([0.5, 0.4, 0.1], False, policy, lambda: 1.0) == "low_margin"
    assert capture_reason([0.9, 0.1], False, policy, lambda: 0.05) == "random"
    assert capture_reason([0.9, 0.1], False, policy, lambda: 0.5) is None


def test_capture_is_the_encoded_image_and_a_sidecar_under_its_predicted_label(
    tmp_path: Path,
) -> None:
    counts = Counts()
    writer = _writer(tmp_path, counts, per_second=100)
    assert writer.offer(_capture(1))
    writer.close()
    assert counts.captured == ["low_margin"]
    images = list((tmp_path / "unlabeled" / "cat").glob("*.png"))
    assert len(images) == 1
    assert images[0].read_bytes() == _png(1)
    sidecar = json.loads(images[0].with_suffix(".png.json").read_text())
    assert sidecar["request_id"] == "req-1"
    assert sidecar["probabilities"] == {"cat": 0.55, "dog/../x": 0.45}


def test_a_hostile_label_stays_inside_the_directory(tmp_path: Path) -> None:
    counts = Counts()
    writer = _writer(tmp_path / "captures", counts, per_second=100)
    writer.offer(_capture(2, {"../../etc": 0.6, "b": 0.4}))
    writer.close()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(tmp_path / "captures" / "unlabeled") for p in written)


def test_size_cap_deletes_the_oldest_first(tmp_path: Path) -> None:
    counts = Counts()
    one = len(_png(0)) + 200  # an image and its sidecar, roughly
    writer = _writer(tmp_path, counts, per_second=1000, max_bytes=3 * one)
    for seed in range(10):
        writer.offer(_capture(seed))
    writer.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 3 * one
    kept = sorted(p.read_bytes() for p in files if p.suffix == ".png")
    assert _png(9) in kept and _png(0) not in kept
    assert len(counts.captured) == 10


def test_rate_limit_drops_and_counts(tmp_path: Path) -> None:
    counts = Counts()
    writer = _writer(tmp_path, counts, per_second=2)
    queued = sum(writer.offer(_capture(seed)) for seed in range(20))
    writer.close()
    assert 1 <= queued <= 3
    assert counts.dropped.count("rate_limited") == 20 - queued


def test_a_failing_volume_drops_captures_without_raising(tmp_path: Path) -> None:
    counts = Counts()
    writer = _writer(tmp_path, counts, per_second=1000)
    writer.offer(_capture(1))
    counts.wait_for(lambda: len(counts.captured) == 1)
    # The volume goes away under the server: the folder becomes a file, writes fail.
    shutil.rmtree(tmp_path / "unlabeled")
    (tmp_path / "unlabeled").write_text("not a directory")
    started = time.monotonic()
    assert writer.offer(_capture(2))  # offering stays instant
    assert time.monotonic() - started < 1.0
    counts.wait_for(lambda: "write_error" in counts.dropped)
    writer.close()


def test_an_unwritable_directory_is_a_start_up_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"capture_dir .* is not writable"):
        _writer(tmp_path / "file" / "captures", Counts())


def _client_capture(seed: int, client: str, image: bytes | None = None) -> Capture:
    scores = {"cat": 0.55, "dog": 0.45}
    return Capture(image or _png(seed), "m", "3", scores, f"r{seed}", "low_margin", client=client)


def test_one_client_gets_only_its_share_of_the_rate(tmp_path: Path) -> None:
    counts = Counts()
    writer = _writer(tmp_path, counts, per_second=8, client_share=0.25)
    greedy = sum(writer.offer(_client_capture(seed, "ipv4:10.0.0.1")) for seed in range(20))
    other = sum(writer.offer(_client_capture(seed, "ipv4:10.0.0.2")) for seed in range(2))
    writer.close()
    assert greedy == 2  # a quarter of 8 a second
    assert other == 2  # the greedy client did not use up the others' rate


def test_queued_bytes_are_bounded(tmp_path: Path) -> None:
    counts = Counts()
    big = _png(1, size=256)
    writer = _writer(tmp_path, counts, per_second=1000, max_queued_bytes=len(big) + 10)
    # The writer thread may take one off the queue meanwhile: at most two fit in a row.
    queued = sum(writer.offer(_client_capture(seed, f"c{seed}", big)) for seed in range(20))
    writer.close()
    assert 1 <= queued <= 3
    assert counts.dropped.count("queue_full") == 20 - queued


def test_a_padded_image_is_stored_re_encoded_and_files_are_not_world_readable(
    tmp_path: Path,
) -> None:
    counts = Counts()
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), (200, 10, 10)).save(buffer, format="JPEG")
    padded = buffer.getvalue() + b"\0" * (3 << 20)  # junk after the image: 3 MiB more
    writer = _writer(tmp_path, counts, per_second=1000, max_image_bytes=1 << 20)
    assert writer.offer(_client_capture(1, "c", padded))
    counts.wait_for(lambda: len(counts.captured) == 1)
    writer.close()
    (image_path,) = [p for p in (tmp_path / "unlabeled").rglob("*") if p.suffix == ".jpg"]
    assert image_path.stat().st_size < 1 << 20
    with Image.open(image_path) as stored:
        assert max(stored.size) == 1024
    sidecar = json.loads(image_path.with_suffix(".jpg.json").read_text())
    assert sidecar["reencoded_from_bytes"] == len(padded)
    for path in (image_path, image_path.with_suffix(".jpg.json")):
        assert path.stat().st_mode & 0o777 == 0o640
