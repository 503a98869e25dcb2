"""A value read from files and read again when they change: rotation without a restart.

Kubernetes updates a mounted Secret by swapping a symlink (the file's inode changes),
cert-manager renews a certificate into that Secret, an operator edits a token file in place
(its size or modification time changes): each is seen by comparing ``os.stat`` of every file
(device, inode, size, mtime) with what was read last. A stat is a few microseconds, so callers
on the request path may ask often; ``min_interval_s`` caps how often the files are looked at.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
# (st_dev, st_ino, st_size, st_mtime_ns) of each file; None for one that cannot be stat'ed.
Stamp = tuple[tuple[int, int, int, int] | None, ...]
# How often the request path looks at the files: a rotation is seen within about this long.
CHECK_INTERVAL_S = 1.0


def stamp_of(paths: Sequence[Path]) -> Stamp:
    """What identifies each file's current content cheaply (following symlinks)."""
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(stamps)


class ReloadingFiles(Generic[T]):
    """``value`` is what ``read`` made of ``paths``; ``refresh`` reads them again when they
    have changed.

    A read that fails (a file missing or invalid) keeps the last good value and is logged
    once: the failed files' stamp counts as seen, so they are read again only when they change
    again. Files that change while being read are read again at the next check, unlogged.
    Thread-safe: grpc calls its certificate fetcher on its own threads.
    """

    def __init__(
        self,
        what: str,
        paths: Sequence[Path],
        read: Callable[[], T],
        *,
        min_interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        Args:
            what: names the value in the log (``bearer tokens``, ``TLS certificate``).
            read: reads and checks the files; raises OSError or ValueError (ssl.SSLError is
                an OSError) when they are unusable.
            min_interval_s: ``refresh`` looks at the files at most this often (0: every call).

        Raises:
            OSError, ValueError: ``read``'s, at the first read (the caller's start-up error).
        """
        self.what = what
        self.paths = tuple(paths)
        self.min_interval_s = min_interval_s
        self.reloads = 0
        self._read = read
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = stamp_of(self.paths)
        self.value = read()
        self._next_check = clock() + min_interval_s

    def refresh(self) -> bool:
        """Read the files again if they changed since the last read; True when ``value`` is new."""
        with self._lock:
            now = self._clock()
            if now < self._next_check:
                return False
            self._next_check = now + self.min_interval_s
            before = stamp_of(self.paths)
            if before == self._seen:
                return False
            try:
                value = self._read()
                error: Exception | None = None
            except (OSError, ValueError) as failure:
                error = failure
            if stamp_of(self.paths) != before:  # changed mid-read: try again next time
                return False
            self._seen = before
            if error is not None:
                log.warning(
                    "%s: cannot read %s again (%s); keeping the previous one until the files "
                    "change again",
                    self.what,
                    ", ".join(map(str, self.paths)),
                    error,
                )
                return False
            if value == self.value:  # touched, not changed
                return False
            self.value = value
            self.reloads += 1
            log.info("%s: read again from %s", self.what, ", ".join(map(str, self.paths)))
            return True
