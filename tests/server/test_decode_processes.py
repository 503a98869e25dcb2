"""Decodes in worker processes: one past its deadline is stopped, its worker killed and
replaced, and none is left after shutdown."""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from contracts.preprocessing import Preprocessing
from server.decode_budget import DecodeMemoryBudget
from server.decode_pool import DecodePool
from server.decode_processes import DecodeProcesses
from server.errors import DeadlineExceeded, InvalidInput
from server.preprocess import ImageLimits

SPEC = Preprocessing((8, 8), 9, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LIMITS = ImageLimits(32 << 20, 50_000_000)
# A 7000 x 7000 PNG takes about 0.7 s to decode on an idle core; a 9 x 9 one a millisecond.
DEADLINE_S = 0.25
# Killing and reaping a worker on a loaded two-core machine.
MARGIN_S = 3.0
# Starting a worker (spawn, then numpy and Pillow imports) and one small decode, loaded machine.
SIBLING_END_S = 30.0


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 160)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _truncated_png() -> bytes:
    """A PNG whose header passes and whose pixels end half way: refused by the decode itself."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie burns no CPU)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    decoder = DecodePool(
        ThreadPoolExecutor(max_workers=2),
        max_pending=8,
        budget=DecodeMemoryBudget(1 << 30),
        processes=DecodeProcesses(DEADLINE_S),
    )
    yield decoder
    decoder.shutdown()


def test_a_decode_past_its_deadline_is_stopped_and_its_worker_replaced(pool: DecodePool) -> None:
    processes = pool.processes
    assert processes is not None
    slow = _png(7000)

    async def scenario() -> None:
        await pool.decode([_png(9)], SPEC, "uint8-nhwc", LIMITS)  # a worker is up
        (before,) = processes.worker_pids()
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"images\[0\] .*decode_timeout_s.* 0.25 s"):
            await pool.decode([slow], SPEC, "uint8-nhwc", LIMITS)
        assert time.monotonic() - started < DEADLINE_S + MARGIN_S
        assert not _is_running(before)  # killed: its CPU is given back, not burnt on
        assert pool.pending == 0 and pool.budget is not None and pool.budget.reserved == 0
        batch = await pool.decode([_png(9), _png(9)], SPEC, "uint8-nhwc", LIMITS)
        assert batch.shape == (2, 8, 8, 3)
        assert before not in processes.worker_pids()

    asyncio.run(scenario())


def test_a_bad_image_is_invalid_from_the_worker_and_the_worker_is_kept(pool: DecodePool) -> None:
    processes = pool.processes
    assert processes is not None

    async def scenario() -> None:
        await pool.decode([_png(9)], SPEC, "uint8-nhwc", LIMITS)
        pids = processes.worker_pids()
        with pytest.raises(InvalidInput, match=r"images\[1\] could not be decoded"):
            await pool.decode([_png(9), _truncated_png()], SPEC, "uint8-nhwc", LIMITS)
        assert set(pids) <= set(processes.worker_pids())
        # images[0] may still be decoding (in a worker started for it) when images[1] fails:
        # it keeps its place in the count until it ends, and then gives it back.
        assert pool.pending <= 1
        deadline = time.monotonic() + SIBLING_END_S
        while pool.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert pool.pending == 0

    asyncio.run(scenario())


def test_shutdown_leaves_no_worker_process(pool: DecodePool) -> None:
    processes = pool.processes
    assert processes is not None

    async def scenario() -> list[int]:
        await asyncio.gather(
            *(pool.decode([_png(64)] * 2, SPEC, "float32-nchw", LIMITS) for _ in range(3))
        )
        return processes.worker_pids()

    pids = asyncio.run(scenario())
    assert 1 <= len(pids) <= 2  # one per decode thread at most
    pool.shutdown()
    assert processes.worker_pids() == []
    assert multiprocessing.active_children() == []
    assert not any(_is_running(pid) for pid in pids)
