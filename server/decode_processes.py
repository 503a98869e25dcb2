"""Image decodes in worker processes, so that a decode past its deadline can be stopped.

A thread inside Pillow cannot be stopped: an image that decodes for a minute holds its core
for a minute after its request was answered. Here each decode thread hands the encoded bytes
to a worker process and waits for the array at most ``timeout_s``; past it, the worker is
killed (the CPU is really given back) and the next decode starts a fresh one. Workers are
started with ``spawn``: the server runs threads, and a forked child inherits their locks in
whatever state they were; ``spawn`` children are also the server's own children, so none
outlives ``shutdown``. A worker reports ready once its imports are done, before it is given
an image, so its start never counts against an image's deadline.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import numpy as np

from contracts.preprocessing import Preprocessing
from server.errors import DeadlineExceeded, InvalidInput, ServerError, ShuttingDown
from server.preprocess import ImageLimits, decode_image

log = logging.getLogger(__name__)

# Longest wait for a new worker's imports (numpy, Pillow) on a loaded machine.
START_TIMEOUT_S = 60.0
# Longest wait for a killed worker to be reaped.
_REAP_TIMEOUT_S = 5.0
_READY = "ready"


def _serve(conn: Connection) -> None:
    """A worker's loop: one job in, one answer out, until the pipe closes or None arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when its workers end
    conn.send(_READY)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        data, index, spec, input_format, limits = job
        try:
            conn.send(("ok", decode_image(data, index, spec, input_format, limits)))
        except InvalidInput as error:
            conn.send(("invalid", str(error)))
        except Exception as error:  # reported to the parent, which logs it
            conn.send(("error", f"{type(error).__name__}: {error}"))


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection


class DecodeProcesses:
    """Worker processes decoding one image each at a time, each decode bounded in time.

    ``decode`` blocks its calling thread; the callers (the decode pool's threads) bound how
    many workers exist: one per thread that is decoding, kept for the next decode after.
    """

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._workers: list[_Worker] = []
        self._closed = False

    def worker_pids(self) -> list[int]:
        """Process ids of the workers alive now (idle or decoding)."""
        with self._lock:
            return [w.process.pid for w in self._workers if w.process.pid is not None]

    def decode(
        self,
        data: bytes,
        index: int,
        spec: Preprocessing,
        input_format: str,
        limits: ImageLimits,
    ) -> np.ndarray:
        """``decode_image`` in a worker, stopped after ``timeout_s``.

        Raises:
            InvalidInput: from ``decode_image``; or the worker died on this image.
            DeadlineExceeded: the decode took longer than ``timeout_s``; its worker is killed.
            ShuttingDown: the pool was shut down.
        """
        worker = self._take()
        where = f"images[{index}]"
        try:
            worker.conn.send((data, index, spec, input_format, limits))
            if not worker.conn.poll(self.timeout_s):
                self._discard(worker)
                raise DeadlineExceeded(
                    f"{where} took longer than the decode deadline (decode_timeout_s) of "
                    f"{self.timeout_s:g} s; its decode was stopped"
                )
            kind, value = worker.conn.recv()
        except (EOFError, OSError):
            self._discard(worker)
            if self._closed:
                raise ShuttingDown("the server is shutting down") from None
            raise InvalidInput(f"{where} could not be decoded (the decoder stopped)") from None
        self._give_back(worker)
        if kind == "ok":
            return np.asarray(value)
        if kind == "invalid":
            raise InvalidInput(value)
        log.error("decode worker failed on %s: %s", where, value)
        raise ServerError(value)

    def shutdown(self) -> None:
        """Kill every worker, idle or decoding, and reap it; later decodes are refused."""
        with self._lock:
            self._closed = True
            idle = {id(worker) for worker in self._idle}
            workers, self._workers, self._idle = self._workers, [], []
        for worker in workers:
            # A decoding worker's pipe is closed by its thread, which wakes when the worker dies.
            _stop(worker, close_pipe=id(worker) in idle)

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._idle:
                return self._idle.pop()
        worker = self._start()
        with self._lock:
            if not self._closed:
                self._workers.append(worker)
                return worker
        _stop(worker)
        raise ShuttingDown("the server is shutting down")

    def _start(self) -> _Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_serve, args=(theirs,), name="decode-worker", daemon=True
        )
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        try:
            ready = ours.poll(START_TIMEOUT_S) and ours.recv() == _READY
        except (EOFError, OSError):
            ready = False
        if not ready:
            _stop(worker)
            raise ServerError(f"a decode worker did not start within {START_TIMEOUT_S:g} s")
        return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        _stop(worker)

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
        _stop(worker)


def _stop(worker: _Worker, *, close_pipe: bool = True) -> None:
    """Kill a worker (a decode in C does not stop on a gentler signal) and reap it."""
    worker.process.kill()
    worker.process.join(_REAP_TIMEOUT_S)
    if close_pipe:
        worker.conn.close()
