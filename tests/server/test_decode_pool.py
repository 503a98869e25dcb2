"""The bounded decode pool: a request whose images do not fit is refused before decoding, and
the decodes share a memory budget."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from contracts.preprocessing import Preprocessing
from server.decode_budget import DecodeMemoryBudget
from server.decode_pool import DecodePool
from server.errors import InvalidInput, Overloaded
from server.preprocess import ImageLimits, decode_memory

SPEC = Preprocessing((8, 8), 9, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LIMITS = ImageLimits(1 << 20, 1 << 20)
LARGE = ImageLimits(32 << 20, 50_000_000)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_full_queue_is_overloaded_and_frees_after() -> None:
    gate = threading.Event()
    executor = ThreadPoolExecutor(max_workers=1)
    executor.submit(gate.wait)  # the only worker is busy: decodes stay queued

    async def scenario() -> None:
        pool = DecodePool(executor, max_pending=3)
        first = asyncio.ensure_future(pool.decode([_png(), _png()], SPEC, "uint8-nhwc", LIMITS))
        await asyncio.sleep(0)
        assert pool.pending == 2
        with pytest.raises(Overloaded, match="decode queue is full"):
            await pool.decode([_png(), _png()], SPEC, "uint8-nhwc", LIMITS)
        gate.set()
        batch = await first
        assert batch.shape == (2, 8, 8, 3) and batch.dtype == np.uint8
        assert pool.pending == 0
        again = await pool.decode([_png()] * 3, SPEC, "uint8-nhwc", LIMITS)
        assert again.shape[0] == 3

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        executor.shutdown()


def test_a_failed_request_frees_only_what_it_no_longer_uses() -> None:
    gate = threading.Event()
    executor = ThreadPoolExecutor(max_workers=1)
    executor.submit(gate.wait)  # the only worker is busy: the decodes below stay queued

    async def scenario() -> None:
        pool = DecodePool(executor, max_pending=8)
        # The first image fails at once (empty), seven good ones wait behind the busy worker.
        failing = asyncio.ensure_future(
            pool.decode([b"", *[_png()] * 7], SPEC, "uint8-nhwc", LIMITS)
        )
        await asyncio.sleep(0)
        assert pool.pending == 8
        with pytest.raises(Overloaded):  # full while they are queued
            await pool.decode([_png()], SPEC, "uint8-nhwc", LIMITS)
        gate.set()
        with pytest.raises(InvalidInput, match=r"images\[0\]"):
            await failing
        # The siblings that had not started were cancelled; none is left counted or queued.
        for _ in range(200):
            if pool.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.pending == 0
        batch = await pool.decode([_png()] * 8, SPEC, "uint8-nhwc", LIMITS)
        assert batch.shape[0] == 8

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        executor.shutdown()


def _large_png(side: int = 2000) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 160)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def test_two_large_images_take_turns_under_a_budget_that_fits_one() -> None:
    image = _large_png()
    cost = decode_memory(image, 0, SPEC, LARGE)
    assert cost == 2000 * 2000 * (4 + 4)  # RGB file pixels, then the RGB image, 4 bytes each
    budget = DecodeMemoryBudget(cost + cost // 2)
    executor = ThreadPoolExecutor(max_workers=2)

    async def scenario() -> None:
        pool = DecodePool(executor, max_pending=8, budget=budget, memory_wait_s=60.0)
        first = pool.decode([image], SPEC, "uint8-nhwc", LARGE)
        second = pool.decode([image], SPEC, "uint8-nhwc", LARGE)
        batches = await asyncio.gather(first, second)
        assert [batch.shape for batch in batches] == [(1, 8, 8, 3)] * 2

    try:
        asyncio.run(scenario())
    finally:
        executor.shutdown()
    assert budget.peak == cost  # one at a time, never over the budget
    assert budget.reserved == 0


def test_an_image_waits_for_memory_then_is_refused_or_decoded() -> None:
    image = _large_png()
    cost = decode_memory(image, 0, SPEC, LARGE)
    budget = DecodeMemoryBudget(cost)
    executor = ThreadPoolExecutor(max_workers=1)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:  # another decode holding the whole budget
        with budget.reserved_for(cost, "elsewhere", wait_s=0):
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()

    async def scenario() -> None:
        pool = DecodePool(executor, max_pending=8, budget=budget, memory_wait_s=0.2)
        started = time.monotonic()
        with pytest.raises(Overloaded, match=r"images\[0\] .*max_decode_memory_mb"):
            await pool.decode([image], SPEC, "uint8-nhwc", LARGE)
        assert time.monotonic() - started >= 0.2
        pool.memory_wait_s = 30.0
        waiting = asyncio.ensure_future(pool.decode([image], SPEC, "uint8-nhwc", LARGE))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        release.set()
        assert (await waiting).shape == (1, 8, 8, 3)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        holder.join()
        executor.shutdown()
    assert budget.peak == cost and budget.reserved == 0


def test_an_image_over_the_whole_budget_is_invalid_naming_the_limit() -> None:
    image = _large_png()
    budget = DecodeMemoryBudget(decode_memory(image, 0, SPEC, LARGE) - 1)
    executor = ThreadPoolExecutor(max_workers=1)

    async def scenario() -> None:
        pool = DecodePool(executor, max_pending=8, budget=budget)
        with pytest.raises(InvalidInput, match=r"images\[1\] needs 31 MiB .*max_decode_memory_mb"):
            await pool.decode([_png(), image], SPEC, "uint8-nhwc", LARGE)

    try:
        asyncio.run(scenario())
    finally:
        executor.shutdown()
    assert budget.reserved == 0
