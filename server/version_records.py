"""What the server remembers about a version across restarts: rollout verdicts and load markers.

A **rollout verdict** is the rollout gate's decision on one version (accepted or refused,
against which older version, with the figures). It is written when the version is judged,
beside the version in the model repository (``REPO/<model>/<version>.verdict.json``), or in
the state directory (``STATE/<model>/<version>.verdict.json``) where the repository is
read-only, and read before every load: a refused version stays refused after a restart, even
when the version it was compared with is gone. A verdict holds for the version's files as they
were judged; a change to any of them, or deleting the verdict file, has the gate judge again.

A **loading marker** (``STATE/<model>/<version>.loading``) exists while this process loads the
version and is removed when the load ends, however it ends, short of the process dying. A
marker left behind therefore means a server died while loading that version (killed for
memory during its warm-up, say): the version is skipped until its files change or the marker
is deleted, so a replica does not crash-loop on it. The marker is locked (``flock``) while its
load runs, so a marker of a live process sharing the state directory is never taken for a
crash. Markers live only in the state directory, which belongs to one replica: a marker on a
shared volume would make every replica skip a version one of them is loading.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contracts.atomic_files import atomic_write_text
from server.errors import ModelLoadError
from server.repository import VersionSource

log = logging.getLogger(__name__)

VERDICT_SUFFIX = ".verdict.json"
LOADING_SUFFIX = ".loading"
VERDICT_FORMAT = "finetune-rollout-verdict/1"
STATE_DIR_MODE = 0o700

# A version's files as version_fingerprint() lists them: (name, mtime_ns, size) each.
Files = tuple[tuple[Any, ...], ...]


class RefusedVersion(ModelLoadError):  # noqa: N818 (names of the domain)
    """A version that stays refused while its files are unchanged: retrying cannot help."""


def default_state_dir(repository: Path) -> Path:
    """``<temp dir>/finetune-server-state-<uid>/<repository name>-<digest of its path>``.

    The temp directory because the state must be this replica's own (see the module docstring)
    and writable where the model repository is mounted read-only; in Kubernetes ``/tmp`` is an
    emptyDir, which survives the container restarts that a crash during a load causes. The
    repository's path is in the name so servers of several repositories on one host keep apart.
    """
    resolved = str(Path(repository).resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / f"finetune-server-state-{os.geteuid()}"
    return root / f"{Path(resolved).name or 'repository'}-{digest}"


def utc_now() -> str:
    """The time a verdict or marker records, ISO 8601 in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _files_from_json(value: Any) -> Files | None:
    if not isinstance(value, list):
        return None
    return tuple(tuple(entry) for entry in value if isinstance(entry, list))


@dataclass(frozen=True)
class RolloutRecord:
    """The rollout gate's decision on one version, as written to its verdict file.

    Attributes:
        baseline_version: the older version whose golden set judged it; None when there was
            none with a golden set.
        baseline_accuracy, accuracy, images: the figures on the baseline's golden set (None,
            None, 0 when nothing could be compared: no older version, or no labelled images
            in its golden set).
        holdout_baseline_accuracy, holdout_accuracy, holdout_images: the figures on this
            version's holdout set of reviewed production images (None, None, 0 without one).
        max_drop: the allowed accuracy drop when it was judged.
        files: the version's files when it was judged (``version_fingerprint``).
    """

    model: str
    version: int
    accepted: bool
    reason: str
    baseline_version: int | None = None
    baseline_accuracy: float | None = None
    accuracy: float | None = None
    images: int = 0
    holdout_baseline_accuracy: float | None = None
    holdout_accuracy: float | None = None
    holdout_images: int = 0
    max_drop: float = 0.0
    files: Files = ()
    decided_at: str = ""

    def refuses_under(self, max_drop: float) -> bool:
        """Whether the version is refused with the allowed drop the server runs with now.

        An operator who raises ``rollout_max_accuracy_drop`` lets a refused version through
        without deleting its verdict; lowering it does not refuse an accepted one (a serving
        version is not withdrawn by a restart).
        """
        if self.accepted:
            return False
        pairs = [
            (accuracy, baseline)
            for accuracy, baseline in (
                (self.accuracy, self.baseline_accuracy),
                (self.holdout_accuracy, self.holdout_baseline_accuracy),
            )
            if accuracy is not None and baseline is not None
        ]
        if not pairs:
            return True
        return any(accuracy < baseline - max_drop - 1e-9 for accuracy, baseline in pairs)

    def describe(self) -> str:
        verdict = "accepted" if self.accepted else "refused"
        when = f" on {self.decided_at}" if self.decided_at else ""
        return f"rollout gate {verdict}{when}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["files"] = [list(entry) for entry in self.files]
        return {"format": VERDICT_FORMAT, **document}

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> RolloutRecord:
        """Raises ValueError (or KeyError, TypeError) for a document that is not a verdict."""
        if document.get("format") != VERDICT_FORMAT:
            raise ValueError(f"format is not {VERDICT_FORMAT}")
        files = _files_from_json(document.get("files"))
        if files is None:
            raise ValueError("files must be a list")
        fields = {k: v for k, v in document.items() if k not in ("format", "files")}
        record = cls(**fields, files=files)
        if not isinstance(record.accepted, bool) or not isinstance(record.version, int):
            raise ValueError("accepted must be true or false and version an integer")
        return record


@dataclass(frozen=True)
class CrashedLoad:
    """A loading marker whose process is gone: a server died while loading this version."""

    path: Path
    started_at: str
    pid: int | None

    def describe(self) -> str:
        return (
            f"a server process (pid {self.pid}) died while loading this version on "
            f"{self.started_at}; skipped until its files change or {self.path} is deleted"
        )


class LoadingMarker:
    """A held loading marker; ``release()`` removes it (idempotent)."""

    def __init__(self, path: Path | None, descriptor: int | None) -> None:
        self.path = path
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is None or self.path is None:
            return
        # Unlinked before it is unlocked: nobody can lock it and take it for a crash.
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._descriptor)
        self._descriptor = None
        # Only when empty: no directory per model and repository is left behind.
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()
            self.path.parent.parent.rmdir()


class VersionRecords:
    """Reads and writes the verdicts and loading markers of every model's versions."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._warned_untrusted = False

    def _state_path(self, source: VersionSource, suffix: str) -> Path:
        return self.state_dir / source.model_name / f"{source.version}{suffix}"

    @staticmethod
    def _beside_path(source: VersionSource) -> Path:
        return source.directory.parent / f"{source.version}{VERDICT_SUFFIX}"

    def _is_trusted(self) -> bool:
        """Whether what the state directory holds may be believed: it is missing (nothing to
        read) or this server's own. Another user's could hold markers planted to make this
        server skip versions."""
        try:
            owner = self.state_dir.stat().st_uid
        except FileNotFoundError:
            return True
        except OSError as error:
            log.warning("state directory %s cannot be read: %s", self.state_dir, error)
            return False
        if owner != os.geteuid():
            if not self._warned_untrusted:
                self._warned_untrusted = True
                log.error(
                    "state directory %s belongs to uid %d, not to this server: ignored (set "
                    "--state-dir)",
                    self.state_dir,
                    owner,
                )
            return False
        return True

    def _state_model_dir(self, source: VersionSource) -> Path:
        """The model's directory in the state directory, made ours (0700) if missing.

        Raises:
            OSError: it cannot be made, or the state directory belongs to another user (who
                could otherwise plant markers that make this server skip versions).
        """
        for directory in (self.state_dir.parent, self.state_dir):
            directory.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        owner = self.state_dir.stat().st_uid
        if owner != os.geteuid():
            raise PermissionError(f"{self.state_dir} belongs to uid {owner}, not to this server")
        directory = self.state_dir / source.model_name
        directory.mkdir(mode=STATE_DIR_MODE, exist_ok=True)
        return directory

    def fingerprint(self, source: VersionSource) -> tuple:
        """What the version's verdict files and loading marker look like now."""
        paths = (
            self._beside_path(source),
            self._state_path(source, VERDICT_SUFFIX),
            self._state_path(source, LOADING_SUFFIX),
        )
        stamps: list[tuple[int, int] | None] = []
        for path in paths:
            try:
                info = path.stat()
            except OSError:
                stamps.append(None)
            else:
                stamps.append((info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    # Verdicts.

    def read_verdict(
        self, source: VersionSource, files: Files
    ) -> tuple[RolloutRecord, Path] | None:
        """The verdict on the version's current files and where it is: beside the version
        first, then in the state directory.

        An unreadable verdict, or one on other files, is logged and ignored (the gate judges
        the version again and writes a new one).
        """
        paths = [self._beside_path(source)]
        if self._is_trusted():
            paths.append(self._state_path(source, VERDICT_SUFFIX))
        for path in paths:
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            except OSError as error:
                log.warning("rollout verdict %s cannot be read: %s; judging again", path, error)
                continue
            try:
                record = RolloutRecord.from_dict(json.loads(text))
            except (ValueError, KeyError, TypeError) as error:
                log.warning("rollout verdict %s is not a verdict (%s); judging again", path, error)
                continue
            if record.files != files:
                log.info("%s: the version's files changed since it was judged; judging again", path)
                continue
            return record, path
        return None

    def write_verdict(self, source: VersionSource, record: RolloutRecord) -> Path | None:
        """Write the verdict atomically beside the version, else in the state directory.

        Returns where it was written; None (logged) when neither place takes it: the version
        is judged again at the next load.
        """
        text = json.dumps(record.to_dict(), indent=2) + "\n"
        beside = self._beside_path(source)
        try:
            atomic_write_text(beside, text)
        except OSError as error:
            log.info(
                "model %s version %d: %s is not writable (%s); keeping the verdict in %s",
                source.model_name,
                source.version,
                beside.parent,
                error.strerror or error,
                self.state_dir,
            )
        else:
            # A verdict on the same version left in the state dir would be read second: drop
            # it so nobody wonders which one holds.
            with contextlib.suppress(OSError):
                self._state_path(source, VERDICT_SUFFIX).unlink()
            return beside
        try:
            path = self._state_model_dir(source) / f"{source.version}{VERDICT_SUFFIX}"
            atomic_write_text(path, text, mode=0o600)
        except OSError as error:
            log.error(
                "model %s version %d: rollout verdict not kept (%s); it is judged again at "
                "the next load",
                source.model_name,
                source.version,
                error,
            )
            return None
        return path

    # Loading markers.

    def mark_loading(self, source: VersionSource, files: Files) -> LoadingMarker:
        """Create and lock the version's loading marker before its load starts.

        Not fsynced: it must outlive the process, not the machine (the state directory does
        not either). A marker that cannot be written is logged and the load goes ahead.
        """
        try:
            path = self._state_model_dir(source) / f"{source.version}{LOADING_SUFFIX}"
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as error:
            log.warning(
                "model %s version %d: no loading marker (%s); a crash while loading it would "
                "be retried at the next start",
                source.model_name,
                source.version,
                error,
            )
            return LoadingMarker(None, None)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another live server sharing this state dir is loading it
            os.close(descriptor)
            return LoadingMarker(None, None)
        document = {
            "model": source.model_name,
            "version": source.version,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": utc_now(),
            "files": [list(entry) for entry in files],
        }
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(document).encode())
        return LoadingMarker(path, descriptor)

    def crashed_load(self, source: VersionSource, files: Files) -> CrashedLoad | None:
        """The marker a dead process left on this version's current files, if any.

        A marker on other files (the version was replaced since) is removed: the new files
        get their chance.
        """
        path = self._state_path(source, LOADING_SUFFIX)
        if not self._is_trusted():
            return None
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as error:
            log.warning("loading marker %s cannot be read: %s", path, error)
            return None
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return None  # locked: a live process is loading it right now
            if os.fstat(descriptor).st_nlink == 0:
                return None  # removed by its process as this one opened it: the load ended
            document = _read_json(descriptor)
            if _files_from_json(document.get("files")) != files:
                log.info("%s: the version's files changed since; loading it again", path)
                with contextlib.suppress(OSError):
                    path.unlink()
                return None
            pid = document.get("pid")
            return CrashedLoad(
                path, str(document.get("started_at", "?")), pid if isinstance(pid, int) else None
            )
        finally:
            os.close(descriptor)


def _read_json(descriptor: int) -> dict[str, Any]:
    """The marker's document; an empty or garbled one (the process died writing it) is {}."""
    chunks = []
    while chunk := os.read(descriptor, 65536):
        chunks.append(chunk)
    try:
        document = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}
