"""Capture for review: a bounded, rate-limited sample of what the model was unsure about.

Opt-in (``--capture-dir``). Each captured image is written as it arrived (the encoded bytes)
with a JSON sidecar (model, version, probabilities, time, request id, why it was captured)
under ``CAPTURE_DIR/unlabeled/<predicted label>/``, a layout any labelling tool can browse and
``trainer ingest`` reads back. A capture never blocks or fails a request: requests only
offer images to a bounded queue, one background thread writes them, and a full queue, a
full disk or a slow volume drop captures and count them. The directory is kept under a size
cap by deleting the oldest captures first. Captured images are user data: see README.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from contracts.atomic_files import atomic_write_bytes
from server.errors import ConfigError

log = logging.getLogger(__name__)

UNLABELED = "unlabeled"
SIDECAR_SUFFIX = ".json"
_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"BM", ".bmp"))
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class CapturePolicy:
    """Which predictions to keep and how much of them."""

    max_bytes: int = 1 << 30
    per_second: float = 5.0
    margin: float = 0.2
    random_share: float = 0.01
    queue_size: int = 64


@dataclass(frozen=True)
class Capture:
    """One image offered for capture, with what the model said about it."""

    image: bytes
    model: str
    version: str
    probabilities: dict[str, float]
    request_id: str
    reason: str
    received_at: float = field(default_factory=time.time)


def capture_reason(
    scores: list[float], abstained: bool, policy: CapturePolicy, draw: Callable[[], float]
) -> str | None:
    """Why this prediction deserves review, or None: abstained, low margin, or a random few."""
    if abstained:
        return "abstained"
    ordered = sorted(scores, reverse=True)
    if len(ordered) > 1 and ordered[0] - ordered[1] < policy.margin:
        return "low_margin"
    if draw() < policy.random_share:
        return "random"
    return None


class CaptureWriter:
    """Writes offered captures from one background thread; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        policy: CapturePolicy,
        on_captured: Callable[[str], None],
        on_dropped: Callable[[str], None],
    ) -> None:
        """
        Raises:
            ConfigError: the directory cannot be created or written (a start-up error).
        """
        self.root = directory / UNLABELED
        self.policy = policy
        self._on_captured = on_captured
        self._on_dropped = on_dropped
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise ConfigError(f"capture_dir {directory} is not writable: {error}") from None
        self._files: deque[tuple[Path, int]] = deque(self._existing())
        self._bytes = sum(size for _, size in self._files)
        self._queue: queue.Queue[Capture | None] = queue.Queue(policy.queue_size)
        self._tokens = policy.per_second
        self._refilled = time.monotonic()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_forever, name="capture", daemon=True)
        self._thread.start()

    def offer(self, capture: Capture) -> bool:
        """Queue a capture if the rate allows; never blocks. Returns whether it was queued."""
        if not self._take_token():
            self._on_dropped("rate_limited")
            return False
        try:
            self._queue.put_nowait(capture)
        except queue.Full:
            self._on_dropped("queue_full")
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout``), then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _take_token(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(
                self.policy.per_second,
                self._tokens + (now - self._refilled) * self.policy.per_second,
            )
            self._refilled = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True

    def _write_forever(self) -> None:
        while (capture := self._queue.get()) is not None:
            try:
                self._write(capture)
            except OSError as error:  # a full disk or a vanished volume: drop, keep serving
                log.warning("capture dropped: %s", error)
                self._on_dropped("write_error")
            else:
                self._on_captured(capture.reason)

    def _write(self, capture: Capture) -> None:
        predicted = max(capture.probabilities, key=capture.probabilities.__getitem__, default="")
        folder = self.root / (_UNSAFE.sub("_", predicted).strip(".") or "unknown")
        stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(capture.received_at))}-" + (
            f"{os.getpid()}-{random.getrandbits(48):012x}"
        )
        image_path = folder / f"{stem}{_extension(capture.image)}"
        sidecar = json.dumps(
            {
                "model": capture.model,
                "version": capture.version,
                "probabilities": capture.probabilities,
                "request_id": capture.request_id,
                "reason": capture.reason,
                "received_at": capture.received_at,
            },
            sort_keys=True,
        ).encode()
        incoming = len(capture.image) + len(sidecar)
        if incoming > self.policy.max_bytes:
            raise OSError(f"one capture ({incoming} bytes) exceeds capture_max_bytes")
        self._evict(incoming)
        atomic_write_bytes(image_path, capture.image)
        sidecar_path = image_path.with_suffix(image_path.suffix + SIDECAR_SUFFIX)
        atomic_write_bytes(sidecar_path, sidecar)
        self._files.extend(((image_path, len(capture.image)), (sidecar_path, len(sidecar))))
        self._bytes += incoming

    def _evict(self, incoming: int) -> None:
        while self._files and self._bytes + incoming > self.policy.max_bytes:
            path, size = self._files.popleft()
            path.unlink(missing_ok=True)
            self._bytes -= size

    def _existing(self) -> list[tuple[Path, int]]:
        found = []
        for path in self.root.rglob("*"):
            try:
                if path.is_file() and not path.name.startswith("."):
                    stat = path.stat()
                    found.append((stat.st_mtime, path, stat.st_size))
            except OSError:
                continue
        return [(path, size) for _, path, size in sorted(found)]


def _extension(image: bytes) -> str:
    for magic, suffix in _MAGIC:
        if image.startswith(magic):
            return suffix
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return ".webp"
    return ".bin"
