"""The server's hostile corpus through the trainer's decoder: the refused files are skipped
and logged as corrupt images are, the 16-bit PNG is decoded, each within the server's budget.

Before the header check the trainer paid these every epoch: the repeated-scan JPEG ~93 s of
CPU, the RLE8 BMP ~7 s and +478 MiB, the 16-bit PNG 4 s and +1,336 MiB.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import decode_cost_probe
import pytest
from decode_bomb_factory import REPEATED_SCAN_JPEG, RLE8_BMP, WIDE_PNG, WIDE_PNG_SIDE, write_bombs
from decode_cost_probe import MAX_CPU_S, MAX_PEAK_MIB, MAX_WALL_S, own_wall_s, within_budget
from PIL import Image

from trainer.data.folders import Sample, decode_all
from trainer.errors import DataError

Reports = dict[str, dict[str, Any]]
MIB = 2**20


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bombs(tmp_path_factory.mktemp("bombs"))


@pytest.fixture(scope="module")
def costs(bombs: Path) -> Reports:
    return decode_cost_probe.run("trainer", str(bombs))


@pytest.mark.parametrize("call", ["open_rgb", "decode_image"])
@pytest.mark.parametrize(
    ("name", "message"),
    [
        (REPEATED_SCAN_JPEG, "a JPEG of more than 32 scans"),
        (RLE8_BMP, "a BMP with RLE8 compression"),
    ],
)
def test_expensive_structure_is_a_corrupt_image(
    costs: Reports, call: str, name: str, message: str
) -> None:
    report = costs[f"{call}/{name}"]
    assert report["outcome"] == "invalid", report  # CorruptImage
    assert f"{name}: {message}" in report["detail"]
    assert within_budget(report), report


def test_sixteen_bit_png_is_decoded_within_the_budget(costs: Reports) -> None:
    report = costs[f"open_rgb/{WIDE_PNG}"]
    assert report["outcome"] == "ok", report
    assert within_budget(report), report


def test_sixteen_bit_png_tensor_costs_the_budget_and_itself(costs: Reports) -> None:
    # decode_image's answer is a full-size tensor (3 x 50 MP = 143 MiB); beyond it, the budget.
    report = costs[f"decode_image/{WIDE_PNG}"]
    assert report["detail"] == f"torch.Size([3, {WIDE_PNG_SIDE}, {WIDE_PNG_SIDE}])", report
    tensor_mib = 3 * WIDE_PNG_SIDE**2 / MIB
    assert report["peak_mib"] <= MAX_PEAK_MIB + tensor_mib, report
    assert report["cpu_s"] <= MAX_CPU_S and own_wall_s(report) <= MAX_WALL_S, report


def test_refused_files_are_skipped_and_logged(
    bombs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    samples = [
        Sample(bombs / REPEATED_SCAN_JPEG, 0),
        Sample(good, 1),
        Sample(bombs / RLE8_BMP, 0),
    ]
    with caplog.at_level(logging.WARNING):
        images, labels = decode_all(samples, shorter_side=32, strict=False, threads=1)
    assert labels == [1] and images[0].shape == (3, 30, 40)
    assert "skipped 2 unreadable image(s)" in caplog.text
    assert f"{REPEATED_SCAN_JPEG}: a JPEG of more than 32 scans" in caplog.text
    assert f"{RLE8_BMP}: a BMP with RLE8 compression" in caplog.text
    with pytest.raises(DataError, match=r"2 unreadable image\(s\) \(strict_data is on\)"):
        decode_all(samples, shorter_side=32, strict=True, threads=1)
