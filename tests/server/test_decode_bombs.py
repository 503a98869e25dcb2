"""Small images that cost minutes of CPU or gigabytes to decode, through the server's decoder
and a real server: each refused from its header, or decoded within the budget.

Before the header check (contracts.image_header) and the banded 16-bit conversion, measured:
the repeated-scan JPEG cost ~90 s of CPU, the RLE8 BMP ~5 s holding the GIL, the 16-bit PNG
4.4 s and +1,336 MiB. The decodes run in a fresh process (decode_cost_probe), the only place
where one decode's peak memory, Pillow's C allocations included, can be read.
"""

from __future__ import annotations

from typing import Any

import decode_cost_probe
import pytest
from decode_bomb_factory import REPEATED_SCAN_JPEG, RLE8_BMP, WIDE_PNG, write_bombs
from decode_cost_probe import within_budget

Reports = dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def costs(tmp_path_factory: pytest.TempPathFactory) -> Reports:
    folder = write_bombs(tmp_path_factory.mktemp("bombs"))
    return decode_cost_probe.run("server", str(folder), WIDE_PNG)


@pytest.mark.parametrize("call", ["decode_image", "classify"])
@pytest.mark.parametrize(
    ("name", "message"),
    [
        (REPEATED_SCAN_JPEG, "is refused: a JPEG of more than 32 scans"),
        (RLE8_BMP, "is refused: a BMP with RLE8 compression"),
    ],
)
def test_expensive_structure_is_refused_from_the_header(
    costs: Reports, call: str, name: str, message: str
) -> None:
    report = costs[f"{call}/{name}"]
    assert report["outcome"] == "invalid", report  # Classify: INVALID_ARGUMENT
    assert report["detail"].startswith(f"images[0] {message}")
    assert within_budget(report), report


@pytest.mark.parametrize("call", ["decode_image", "classify"])
def test_sixteen_bit_png_is_decoded_within_the_budget(costs: Reports, call: str) -> None:
    report = costs[f"{call}/{WIDE_PNG}"]
    assert report["outcome"] == "ok", report
    assert within_budget(report), report


def test_two_sixteen_bit_pngs_in_one_request_cost_two_budgets(costs: Reports) -> None:
    # Before: the server went from 238 to 2,910 MiB. The pool may decode both at once.
    report = costs[f"classify/{WIDE_PNG} twice"]
    assert report["outcome"] == "ok", report
    assert within_budget(report, images=2), report
