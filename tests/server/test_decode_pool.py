"""The bounded decode pool: a request whose images do not fit is refused before decoding."""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from contracts.preprocessing import Preprocessing
from server.decode_pool import DecodePool
from server.errors import InvalidInput, Overloaded
from server.preprocess import ImageLimits

SPEC = Preprocessing((8, 8), 9, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LIMITS = ImageLimits(1 << 20, 1 << 20)


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
