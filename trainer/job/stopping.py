"""Graceful stop on SIGTERM (Kubernetes preemption, torchrun shutdown), in every stage of a run.

Inside the phases the handler only sets a flag: the loop finishes its current step, saves a
checkpoint and exits 0. Outside them (the data scan, the feature cache, the head fit, the LR
range test, the phase-2 trials, calibration, the export) there is no step to finish and
nothing a checkpoint could hold that resuming would not redo, so in those stages
(``StopRequest.enter_stage``) the handler raises ``RunStopped`` and the run unwinds from
wherever it is: every file those stages write is written atomically, and ``--resume auto``
redoes the interrupted stage. A watchdog
ends the process if stopping takes longer than the configured bound, so a stuck step cannot
outlive the pod's grace period silently.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Exit status when the bounded stop time runs out: 128 + SIGTERM, as if killed by it.
TIMEOUT_EXIT_CODE = 143


class RunStopped(BaseException):
    """A stop request in a stage with no step to finish; ``stage`` names where it landed.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way
    up mistakes it for a failure of the stage it interrupted.
    """

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class StopRequest:
    """Set by SIGTERM/SIGINT; ``should_stop`` agrees across ranks so all stop at one step."""

    def __init__(self, timeout_seconds: float, *, distributed: bool, device: torch.device) -> None:
        self.timeout_seconds = timeout_seconds
        self.distributed = distributed
        self.device = device
        self._requested = threading.Event()
        self._watchdog: threading.Timer | None = None
        self._previous: dict[int, object] = {}
        self._stage_stopping_at_once: str | None = None

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the previous handlers and cancel the watchdog."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def enter_stage(self, stage: str | None) -> None:
        """Say where the run is: a named stage stops at once (``RunStopped``), also for a
        request that came before; ``None`` (the phases) lets the loop finish its step."""
        self._stage_stopping_at_once = stage
        if stage is not None and self._requested.is_set():
            raise RunStopped(stage)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._requested.is_set():
            return
        stage = self._stage_stopping_at_once
        log.warning(
            "received %s %s, exiting (within %.0f s)",
            signal.Signals(signum).name,
            "in the current step: finishing it, saving a checkpoint"
            if stage is None
            else f"during {stage}: stopping it",
            self.timeout_seconds,
        )
        self._requested.set()
        self._watchdog = threading.Timer(self.timeout_seconds, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()
        if stage is not None:
            raise RunStopped(stage)

    def _expire(self) -> None:
        log.error(
            "could not stop within %.0f s; exiting without a final checkpoint", self.timeout_seconds
        )
        logging.shutdown()
        os._exit(TIMEOUT_EXIT_CODE)

    def request(self) -> None:
        """Ask for a stop as a signal would (tests and callers without signals)."""
        self._requested.set()

    @property
    def is_requested(self) -> bool:
        """Whether this process received the stop request."""
        return self._requested.is_set()

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank was asked to stop (one collective per call)."""
        if not self.distributed:
            return self._requested.is_set()
        flag = torch.tensor([1.0 if self._requested.is_set() else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
