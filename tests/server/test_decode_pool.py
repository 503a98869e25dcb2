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
from server.errors import Overloaded
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
