"""Loaded model versions and hot reload.

The manager reads the repository, loads every version the policy selects (sessions + warm-up,
off the event loop; ``server.version_loader``), and polls for changes. A new version is swapped
in only after it loaded, warmed up and passed its checks; a version that fails is rejected with
a log line and a metric while the old one keeps serving. A version leaving the policy is
removed from lookup at once and unloaded only after the requests holding it (leases) finish,
so a swap under load fails no request; then its metric series are dropped. A rejected version
is retried with exponential backoff (``load_retry_s`` doubling) and at once when any of its
files, config.pbtxt or the labels change; a change to config.pbtxt or the labels reloads the
model's loaded versions the same swap-in way.

It fails closed across restarts (``server.version_records``): a version the rollout gate
refused stays refused (its verdict is on file), and a version a server died loading is skipped;
neither is retried until its files change, and the newest older version that loads serves
instead. Trouble with one model during a poll (an unreadable file, a symbolic link loop) stays
with that model: the others keep loading and serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from server.errors import ModelLoadError, ModelNotFound, ModelNotReady, ServerError
from server.load_thread import LoadCancelled
from server.metrics import ServerMetrics
from server.model_version import ModelVersion
from server.prediction_monitor import prediction_label_values
from server.repository import (
    ConfigParser,
    ModelSource,
    VersionSource,
    list_models,
    read_model,
    version_fingerprint,
)
from server.version_loader import VersionLoader, precision_label
from server.version_records import RefusedVersion
from server.version_states import LOADING, READY, UNAVAILABLE, VersionState

log = logging.getLogger(__name__)

# Called with (model, version) once a retired version is unloaded and its series are dropped.
RetiredCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class ManagerSettings:
    """The server settings the manager takes (``ServerConfig``'s fields of these names)."""

    model_repository: Path
    model_name: str | None
    load_retry_s: float


class ModelManager:
    """Owns every loaded version; looks them up for handlers; reloads on change."""

    def __init__(
        self,
        settings: ManagerSettings,
        loader: VersionLoader,
        metrics: ServerMetrics,
        parse_config: ConfigParser,
        on_retired: RetiredCallback | None = None,
    ) -> None:
        """
        Args:
            loader: loads one version (plan, sessions, checks, batcher); built with the
                version records it and the manager share.
            on_retired: told (model, version) when a retired version is gone for good, so
                what else keeps state per version (the prediction monitors) can drop it.
        """
        self.settings = settings
        self.loader = loader
        self.metrics = metrics
        self.parse_config = parse_config
        self._on_retired = on_retired
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._rejected: dict[tuple[str, int], _Rejection] = {}
        # model -> why it could not be read at the last poll (its config.pbtxt, its labels).
        self._model_errors: dict[str, str] = {}
        # model -> its config.pbtxt and label files as last loaded (a change reloads it).
        self._fingerprints: dict[str, tuple] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock: asyncio.Lock | None = None

    @property
    def is_ready(self) -> bool:
        return any(self._models.values())

    def model_names(self) -> list[str]:
        return sorted(name for name, versions in self._models.items() if versions)

    def default_model_name(self) -> str:
        """The model served when a request names none: --model-name, else the first one."""
        names = self.model_names()
        if self.settings.model_name:
            return self.settings.model_name
        if not names:
            raise ModelNotReady("no model is loaded")
        return names[0]

    def versions(self, name: str) -> list[ModelVersion]:
        return [self._models[name][v] for v in sorted(self._models.get(name, {}))]

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The loaded version asked for, or the latest loaded one when version is empty."""
        name = name or self.default_model_name()
        versions = self._models.get(name)
        if not versions:
            if self._is_known(name):
                raise ModelNotReady(f"model {name!r} has no loaded version")
            raise ModelNotFound(f"unknown model {name!r}")
        if not version:
            return versions[max(versions)]
        if not (version.isascii() and version.isdigit()) or int(version) not in versions:
            raise ModelNotFound(
                f"model {name!r} has no loaded version {version!r} "
                f"(loaded: {', '.join(str(v) for v in sorted(versions))})"
            )
        return versions[int(version)]

    def _is_known(self, name: str) -> bool:
        return name in self._models

    @contextlib.asynccontextmanager
    async def lease(self, name: str, version: str = "") -> AsyncIterator[ModelVersion]:
        """Hold a version for the length of a request so a reload cannot unload it."""
        model = self.resolve(name, version)
        model.acquire()
        try:
            yield model
        finally:
            model.release()

    async def refresh(self) -> None:
        """Load new versions, reject broken ones, retire versions the policy dropped."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            names = await asyncio.to_thread(
                list_models, self.settings.model_repository, self.settings.model_name or ""
            )
            if self.settings.model_name:
                if self.settings.model_name not in names:
                    raise ModelLoadError(
                        f"model {self.settings.model_name!r} not found in "
                        f"{self.settings.model_repository} (found: {names})"
                    )
                names = [self.settings.model_name]
            for name in names:
                try:
                    await self._refresh_model(name)
                except Exception as error:  # one model's trouble must not stop the others
                    self._model_failed(name, error)

    def _model_failed(self, name: str, error: Exception) -> None:
        """Keep an error of one model's poll with that model: logged, and its index reason."""
        if isinstance(error, (ServerError, OSError, RuntimeError, ValueError)):
            log.error("model %s: skipped in this poll: %s", name, error)
        else:
            log.exception("model %s: skipped in this poll", name)
        self._model_errors[name] = f"cannot read the model: {error}"

    async def _refresh_model(self, name: str) -> None:
        try:
            source = await asyncio.to_thread(
                read_model, self.settings.model_repository, name, self.parse_config
            )
        except ModelLoadError as error:
            log.error("model %s: cannot read its configuration: %s", name, error)
            self._model_errors[name] = str(error)
            return
        self._model_errors.pop(name, None)
        on_disk = {v.version for v in source.available}
        for key in [k for k in self._rejected if k[0] == name and k[1] not in on_disk]:
            del self._rejected[key]
        loaded = self._models.setdefault(name, {})
        previous = self._fingerprints.get(name)
        if loaded and previous is not None and previous != source.fingerprint:
            await self._reload(source, loaded)
        self._fingerprints[name] = source.fingerprint
        wanted = {v.version: v for v in source.versions}
        for version, version_source in sorted(wanted.items()):
            if version in loaded or self._recently_rejected(source, version_source):
                continue
            model = await self._load(source, version_source)
            if model is not None:
                loaded[version] = model
        if not loaded:
            await self._fall_back(source, loaded)
        # Retire only once something newer is serving; never leave the model empty.
        for version in [v for v in loaded if v not in wanted]:
            if not any(v in loaded for v in wanted):
                break
            self._retire(loaded.pop(version))

    async def _fall_back(self, source: ModelSource, loaded: dict[int, ModelVersion]) -> None:
        """Nothing the policy selects would load: serve the newest older version that does.

        Without this a restarted server would stay down after a broken version was published,
        although the previous version was healthy.
        """
        wanted = {v.version for v in source.versions}
        newest_wanted = max(wanted, default=0)
        for candidate in reversed(source.available):
            if candidate.version in wanted or candidate.version > newest_wanted:
                continue
            if self._recently_rejected(source, candidate):
                continue
            model = await self._load(source, candidate)
            if model is not None:
                log.warning(
                    "model %s: no version selected by the policy loads; serving version %d",
                    source.name,
                    candidate.version,
                )
                loaded[candidate.version] = model
                return

    async def _reload(self, source: ModelSource, loaded: dict[int, ModelVersion]) -> None:
        """config.pbtxt or the labels changed: load each version afresh, then swap it in.

        Requests holding the old version finish on it (it is retired, not dropped); when a
        version does not load with the new files, the old one keeps serving.
        """
        log.info("model %s: config.pbtxt or labels changed; reloading", source.name)
        by_version = {v.version: v for v in source.available}
        for version, old in list(loaded.items()):
            version_source = by_version.get(version)
            if version_source is None:
                continue
            fresh = await self._load(source, version_source)
            if fresh is not None:
                loaded[version] = fresh
                self._retire(old, reloaded=True)

    def _fingerprint(self, model_source: ModelSource, source: VersionSource) -> tuple:
        """The files a rejection depends on: the model's, the version's, and its records (a
        deleted verdict or loading marker has the version tried again)."""
        return (
            model_source.fingerprint,
            version_fingerprint(source),
            self.loader.records.fingerprint(source),
        )

    def _recently_rejected(self, model_source: ModelSource, source: VersionSource) -> bool:
        """Rejected, with the same files, and its backoff not over yet."""
        rejection = self._rejected.get((source.model_name, source.version))
        if rejection is None:
            return False
        if rejection.fingerprint != self._fingerprint(model_source, source):
            return False
        return time.monotonic() < rejection.retry_at

    def _is_refused_here(self, source: VersionSource) -> bool:
        """Refused by this process for good (the gate, or a crashed load on file)."""
        rejection = self._rejected.get((source.model_name, source.version))
        return rejection is not None and rejection.is_final

    async def _load(self, model_source: ModelSource, source: VersionSource) -> ModelVersion | None:
        """The version loaded and serving, or None when it was rejected or the load stopped."""
        try:
            plan = await asyncio.to_thread(
                self.loader.plan, model_source, source, self._is_refused_here
            )
        except RefusedVersion as error:
            self._reject(model_source, source, error, final=True)
            return None
        try:
            loaded = await self.loader.load(model_source, source, plan)
        except LoadCancelled:  # close() stopped it
            log.warning("model %s version %d: load cancelled", source.model_name, source.version)
            return None
        except RefusedVersion as error:
            self._reject(model_source, source, error, final=True)
            return None
        except ServerError as error:
            self._reject(model_source, source, error)
            return None
        except Exception as error:  # anything while loading must not take the server down
            log.exception("unexpected error loading %s", source.directory)
            self._reject(model_source, source, error)
            return None
        self._rejected.pop((source.model_name, source.version), None)
        return await self.loader.start_serving(model_source, source, loaded, plan)

    def _reject(
        self,
        model_source: ModelSource,
        source: VersionSource,
        error: BaseException,
        *,
        final: bool = False,
    ) -> None:
        """Record a version that did not load; ``final``: not retried while its files are
        unchanged (the gate refused it, or a server died loading it)."""
        key = (source.model_name, source.version)
        previous = self._rejected.get(key)
        attempts = previous.attempts + 1 if previous is not None else 1
        delay = min(self.settings.load_retry_s * 2 ** (attempts - 1), MAX_LOAD_RETRY_S)
        retry = (
            "not retried while its files are unchanged"
            if final
            else f"attempt {attempts}; retried in {delay:.0f} s, or sooner when its files change"
        )
        log.error(
            "model %s version %d rejected, previous versions keep serving: %s (%s)",
            source.model_name,
            source.version,
            error,
            retry,
        )
        self.metrics.model_load_failures.labels(source.model_name).inc()
        retry_at = math.inf if final else time.monotonic() + delay
        self._rejected[key] = _Rejection(
            self._fingerprint(model_source, source), attempts, retry_at, str(error)
        )

    def _retire(self, model: ModelVersion, *, reloaded: bool = False) -> None:
        """Unload ``model`` once its requests finish, then drop its metric series.

        ``reloaded``: a reload of the same version took its place and owns its series now.
        """
        log.info(
            "model %s version %d retired; unloading after in-flight requests",
            model.name,
            model.version,
        )
        if not reloaded:
            self.metrics.model_info.remove(
                model.name,
                model.version_str,
                model.sessions.providers[0],
                precision_label(model.metadata),
            )
        task = asyncio.get_running_loop().create_task(self._unload(model, forget=not reloaded))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _unload(self, model: ModelVersion, *, forget: bool) -> None:
        await model.unload()
        if not forget or model.version in self._models.get(model.name, {}):
            return  # serving again (a fall back, a policy change): its series are live
        # Only now: a request finishing on it until the unload would create them again.
        self.metrics.forget_version(
            model.name, model.version_str, prediction_label_values(model.labels)
        )
        if self._on_retired is not None:
            self._on_retired(model.name, model.version_str)
        log.info(
            "model %s version %d unloaded; its metric series dropped", model.name, model.version
        )

    def repository_index(self) -> list[VersionState]:
        """Every model the repository poll found, with its loaded, loading and refused versions.

        A loaded version is READY even when a later change to its files was refused (it serves
        what it loaded before); the refusal is its reason. Versions the policy left unloaded
        without trying are not listed, as in Triton.
        """
        index = []
        for name in sorted(set(self._models) | set(self._model_errors)):
            loaded = self._models.get(name, {})
            rejected = {v: r.reason for (n, v), r in self._rejected.items() if n == name}
            loading = {v for n, v in self.loader.loading if n == name}
            config_error = self._model_errors.get(name)
            versions = sorted(set(loaded) | set(rejected) | loading)
            for version in versions:
                if version in loaded:
                    refused = config_error or rejected.get(version)
                    reason = f"a change was refused, serving as loaded before: {refused}"
                    index.append(VersionState(name, str(version), READY, reason if refused else ""))
                elif version in loading:
                    index.append(VersionState(name, str(version), LOADING))
                else:
                    index.append(VersionState(name, str(version), UNAVAILABLE, rejected[version]))
            if not versions:
                reason = config_error or "no version loaded"
                index.append(VersionState(name, "", UNAVAILABLE, reason))
        return index

    async def poll_forever(self, interval_s: float) -> None:
        """Refresh every interval_s seconds until cancelled; errors are logged, not raised."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("repository poll failed; will retry")

    async def close(self) -> None:
        """Stop the loads in progress, drain and unload everything (used at shutdown)."""
        await self.loader.stop()
        models = [m for versions in self._models.values() for m in versions.values()]
        self._models = {name: {} for name in self._models}
        await asyncio.gather(*(m.unload() for m in models), *self._retiring)


MAX_LOAD_RETRY_S = 600.0


@dataclass(frozen=True)
class _Rejection:
    """A version that failed to load: with which files, how often, and when to try again."""

    fingerprint: tuple
    attempts: int
    retry_at: float
    reason: str = ""

    @property
    def is_final(self) -> bool:
        return math.isinf(self.retry_at)
