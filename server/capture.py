"""Capture for review: a bounded, rate-limited sample of what the model was unsure about.

Opt-in (``--capture-dir``). Each captured image is written as it arrived (the encoded bytes)
with a JSON sidecar (model, version, probabilities, time, request id, why it was captured)
under ``CAPTURE_DIR/unlabeled/<predicted label>/``, a layout any labelling tool can browse and
``trainer ingest`` reads back (``contracts.capture_files`` owns the sidecar's name and keys).
A capture never blocks or fails a request: requests only offer images to a bounded queue, one
background thread writes them, and a full queue, a full disk or a slow volume drop captures
and count them. The directory is kept under a size
cap by deleting the oldest captures first. Captured images are user data: see README.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import random
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from contracts.atomic_files import atomic_write_bytes
from contracts.capture_files import UNLABELED_DIRNAME, CaptureRecord, sidecar_path
from contracts.image_formats import to_rgb8
from server.errors import ConfigError

log = logging.getLogger(__name__)

_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"BM", ".bmp"))
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# Clients whose capture rate is tracked; the least recently seen is forgotten first.
_TRACKED_CLIENTS = 1024


@dataclass(frozen=True)
class CapturePolicy:
    """Which predictions to keep and how much of them.

    A capture is the server's decision, never a client's: the version's own abstention
    threshold decides it, each client (by address) gets a share of the rate, queued images are
    bounded in bytes, and an image larger than ``max_image_bytes`` (a padded JPEG) is stored
    re-encoded, shrunk to ``reencode_side`` pixels on its long side, instead of whole.
    """

    max_bytes: int = 1 << 30
    per_second: float = 5.0
    margin: float = 0.2
    random_share: float = 0.01
    queue_size: int = 64
    # No client (by address) may take more than this share of ``per_second`` (at least one
    # capture a second), so one client cannot fill the review queue with its own images.
    client_share: float = 0.25
    max_queued_bytes: int = 32 << 20
    max_image_bytes: int = 2 << 20
    reencode_side: int = 1024
    # Captured images are user data: readable by the owner and its group (a labelling tool
    # in the same group), never by everyone on the host.
    file_mode: int = 0o640


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
    # Who sent it (the peer's address): each client gets its own share of the capture rate.
    client: str = ""


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
        self.root = directory / UNLABELED_DIRNAME
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
        self._queued_bytes = 0
        self._rate = _TokenBucket(policy.per_second)
        self._client_rates: OrderedDict[str, _TokenBucket] = OrderedDict()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_forever, name="capture", daemon=True)
        self._thread.start()

    def offer(self, capture: Capture) -> bool:
        """Queue a capture if the rates and the queue's bytes allow; never blocks.

        Returns whether it was queued; a refusal is counted by its cause.
        """
        with self._lock:
            cause = self._admit(capture)
            if cause is None:
                self._queued_bytes += len(capture.image)
        if cause is not None:
            self._on_dropped(cause)
            return False
        try:
            self._queue.put_nowait(capture)
        except queue.Full:
            self._release(capture)
            self._on_dropped("queue_full")
            return False
        return True

    def _admit(self, capture: Capture) -> str | None:
        """The reason to drop ``capture`` (None: keep it); called under the lock."""
        if self._queued_bytes + len(capture.image) > self.policy.max_queued_bytes:
            return "queue_full"
        client = self._client_rates.pop(capture.client, None)
        if client is None:
            client = _TokenBucket(max(1.0, self.policy.per_second * self.policy.client_share))
            while len(self._client_rates) >= _TRACKED_CLIENTS:
                self._client_rates.popitem(last=False)  # the least recently seen
        self._client_rates[capture.client] = client
        if not client.has_token() or not self._rate.has_token():
            return "rate_limited"
        client.take()
        self._rate.take()
        return None

    def _release(self, capture: Capture) -> None:
        with self._lock:
            self._queued_bytes -= len(capture.image)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout``), then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _write_forever(self) -> None:
        while (capture := self._queue.get()) is not None:
            self._release(capture)
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
        image, original_bytes = capture.image, None
        if len(image) > self.policy.max_image_bytes:
            image = reencoded(image, self.policy.reencode_side)
            original_bytes = len(capture.image)
        image_path = folder / f"{stem}{_extension(image)}"
        sidecar = CaptureRecord(
            model=capture.model,
            version=capture.version,
            probabilities=capture.probabilities,
            request_id=capture.request_id,
            reason=capture.reason,
            received_at=capture.received_at,
            reencoded_from_bytes=original_bytes,
        ).to_json_bytes()
        incoming = len(image) + len(sidecar)
        if incoming > self.policy.max_bytes:
            raise OSError(f"one capture ({incoming} bytes) exceeds capture_max_bytes")
        self._evict(incoming)
        mode = self.policy.file_mode
        atomic_write_bytes(image_path, image, mode=mode)
        sidecar_file = sidecar_path(image_path)
        atomic_write_bytes(sidecar_file, sidecar, mode=mode)
        self._files.extend(((image_path, len(image)), (sidecar_file, len(sidecar))))
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


class _TokenBucket:
    """``per_second`` tokens a second, at most ``per_second`` (one second's worth) saved up."""

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.tokens = per_second
        self.refilled = time.monotonic()

    def has_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.per_second, self.tokens + (now - self.refilled) * self.per_second)
        self.refilled = now
        return self.tokens >= 1.0

    def take(self) -> None:
        self.tokens -= 1.0


def reencoded(image: bytes, side: int) -> bytes:
    """``image`` as a JPEG at most ``side`` pixels on its long side (quality 90).

    Only images the server already decoded reach a capture, so the decode is within the
    request limits; the JPEG draft makes a large JPEG's decode cheap here too. An image that
    cannot be re-encoded raises ``OSError`` and is dropped like a failed write.
    """
    try:
        with Image.open(io.BytesIO(image)) as opened:
            opened.draft("RGB", (side, side))
            rgb = to_rgb8(opened)
        rgb.thumbnail((side, side))
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=90)
    except (ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot re-encode the image: {error}") from None
    return buffer.getvalue()


def _extension(image: bytes) -> str:
    for magic, suffix in _MAGIC:
        if image.startswith(magic):
            return suffix
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return ".webp"
    return ".bin"
