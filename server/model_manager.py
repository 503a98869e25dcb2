"""Loaded model versions and hot reload.

The manager reads the repository, loads every version the policy selects (sessions + warm-up,
off the event loop), and polls for changes. A new version is swapped in only after it loaded
and warmed up; a version that fails is rejected with a log line and a metric while the old one
keeps serving. A version leaving the policy is removed from lookup at once and unloaded only
after the requests holding it (leases) finish, so a swap under load fails no request. A
rejected version is retried with exponential backoff (``load_retry_s`` doubling) and at once
when any of its files, config.pbtxt or the labels change; a change to config.pbtxt or the
labels reloads the model's loaded versions the same swap-in way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from contracts.golden_set import InvalidGoldenSet
from contracts.repository_layout import CONFIG_FILENAME
from server.batching import BatchingSettings
from server.config import ServerConfig
from server.errors import ModelLoadError, ModelNotFound, ModelNotReady, ServerError
from server.golden_set import GoldenVerdict, check_golden_set, check_rollout
from server.metrics import ServerMetrics
from server.model_spec import ModelSpec, complete_from_graph, graph_contradictions
from server.model_version import ModelVersion
from server.onnx_sessions import OnnxSessions, SessionSettings
from server.repository import (
    ConfigParser,
    ExportMetadata,
    ModelSource,
    VersionSource,
    list_models,
    read_metadata,
    read_model,
    version_fingerprint,
)
from server.thread_plan import ThreadPlan, plan_from_settings
from server.version_states import LOADING, READY, UNAVAILABLE, VersionState

log = logging.getLogger(__name__)


def batching_settings(settings: ServerConfig, spec: ModelSpec, instances: int) -> BatchingSettings:
    """Server flags override the model's config.pbtxt; no dynamic_batching means batch 1."""
    dynamic = spec.dynamic_batching
    if spec.max_batch_size <= 0:
        max_batch = 0
    elif settings.max_batch_size is not None:
        max_batch = settings.max_batch_size
    else:
        max_batch = spec.max_batch_size if dynamic is not None else 1
    if settings.max_queue_delay_us is not None:
        delay_us = settings.max_queue_delay_us
    else:
        delay_us = dynamic.max_queue_delay_us if dynamic is not None else 0
    queue_size = settings.max_queue_size
    if dynamic is not None and dynamic.max_queue_size > 0:
        queue_size = min(queue_size, dynamic.max_queue_size)
    return BatchingSettings(
        max_batch_size=max_batch,
        max_queue_delay_s=delay_us / 1e6,
        max_queue_size=queue_size,
        workers=instances,
        max_queued_bytes=settings.max_queued_bytes,
    )


def agreed_spec(model: ModelSource, source: VersionSource, sessions: OnnxSessions) -> ModelSpec:
    """The model's config.pbtxt completed from this version's graph.

    Raises:
        ModelLoadError: config.pbtxt contradicts the graph; one line naming each field with
            both values.
    """
    contradictions = graph_contradictions(model.spec, sessions.inputs, sessions.outputs)
    if contradictions:
        raise ModelLoadError(
            f"{model.directory / CONFIG_FILENAME} contradicts {source.onnx_path}: "
            + "; ".join(contradictions)
        )
    return complete_from_graph(model.spec, sessions.inputs, sessions.outputs)


class ModelManager:
    """Owns every loaded version; looks them up for handlers; reloads on change."""

    def __init__(
        self,
        settings: ServerConfig,
        metrics: ServerMetrics,
        parse_config: ConfigParser,
        threads: ThreadPlan | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.parse_config = parse_config
        self.threads = threads or plan_from_settings(settings)
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._rejected: dict[tuple[str, int], _Rejection] = {}
        # model -> why its config.pbtxt could not be read at the last poll.
        self._config_errors: dict[str, str] = {}
        self._loading: set[tuple[str, int]] = set()
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
            names = await asyncio.to_thread(list_models, self.settings.model_repository)
            if self.settings.model_name:
                if self.settings.model_name not in names:
                    raise ModelLoadError(
                        f"model {self.settings.model_name!r} not found in "
                        f"{self.settings.model_repository} (found: {names})"
                    )
                names = [self.settings.model_name]
            for name in names:
                await self._refresh_model(name)

    async def _refresh_model(self, name: str) -> None:
        try:
            source = await asyncio.to_thread(
                read_model, self.settings.model_repository, name, self.parse_config
            )
        except ModelLoadError as error:
            log.error("model %s: cannot read its configuration: %s", name, error)
            self._config_errors[name] = str(error)
            return
        self._config_errors.pop(name, None)
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
                self._retire(old, keep_info=True)

    def _recently_rejected(self, model_source: ModelSource, source: VersionSource) -> bool:
        """Rejected, with the same files, and its backoff not over yet."""
        rejection = self._rejected.get((source.model_name, source.version))
        if rejection is None:
            return False
        if rejection.fingerprint != _fingerprint(model_source, source):
            return False
        return time.monotonic() < rejection.retry_at

    async def _load(self, model_source: ModelSource, source: VersionSource) -> ModelVersion | None:
        started = time.monotonic()
        baseline = self._rollout_baseline(source)
        key = (source.model_name, source.version)
        self._loading.add(key)
        try:
            sessions, metadata, spec = await asyncio.to_thread(
                self._load_sessions, model_source, source, baseline
            )
        except ServerError as error:
            self._reject(model_source, source, error)
            return None
        except Exception as error:  # anything while loading must not take the server down
            log.exception("unexpected error loading %s", source.directory)
            self._reject(model_source, source, error)
            return None
        finally:
            self._loading.discard(key)
        self._rejected.pop((source.model_name, source.version), None)
        name, version = source.model_name, str(source.version)
        model = ModelVersion(
            dataclasses.replace(model_source, spec=spec),
            source,
            sessions,
            metadata,
            self.metrics.queue_seconds.labels(name, version).observe,
        )
        settings = batching_settings(self.settings, model_source.spec, sessions.instances)
        await model.start_batching(settings, self.metrics.observer(name, version))
        self.metrics.model_loads.labels(name).inc()
        self.metrics.model_info.labels(
            name, version, sessions.providers[0], _precision(metadata)
        ).set(1)
        log.info(
            "model %s version %s ready in %.2fs (provider %s, batching %s)",
            name,
            version,
            time.monotonic() - started,
            sessions.providers[0],
            settings,
        )
        return model

    def _rollout_baseline(self, source: VersionSource) -> ModelVersion | None:
        """The newest served version older than ``source``: what ``source`` would replace."""
        older = [
            version
            for number, version in self._models.get(source.model_name, {}).items()
            if number < source.version
        ]
        return max(older, key=lambda version: version.source.version, default=None)

    def _load_sessions(
        self,
        model_source: ModelSource,
        source: VersionSource,
        baseline: ModelVersion | None = None,
    ) -> tuple[OnnxSessions, ExportMetadata | None, ModelSpec]:
        settings = SessionSettings(
            providers=self.settings.providers,
            instances=self.settings.instances,
            intra_op_threads=self.threads.intra_op_threads,
            inter_op_threads=self.threads.inter_op_threads,
            allow_spinning=self.threads.allow_spinning,
            graph_optimization=self.settings.graph_optimization,
        )
        sessions = OnnxSessions(source.onnx_path, settings)
        # Before the warm-up: a batch size the graph cannot take would fail there, less clearly.
        spec = agreed_spec(model_source, source, sessions)
        metadata = read_metadata(source, sessions.custom_metadata)
        self._warm_up(sessions, model_source, source)
        self._check_golden_set(source, metadata, sessions)
        if baseline is not None:
            self._check_rollout(model_source, source, metadata, sessions, baseline)
        return sessions, metadata, spec

    def _check_rollout(
        self,
        model_source: ModelSource,
        source: VersionSource,
        metadata: ExportMetadata | None,
        sessions: OnnxSessions,
        baseline: ModelVersion,
    ) -> None:
        """Refuse a version that does worse than the one it replaces on that one's golden set."""
        labels = metadata.labels if metadata and metadata.labels else model_source.labels
        try:
            verdict = check_rollout(
                baseline.source.directory,
                metadata,
                sessions,
                labels,
                self.settings.rollout_max_accuracy_drop,
            )
        except InvalidGoldenSet as error:
            log.warning("model %s: rollout check skipped: %s", source.model_name, error)
            return
        if verdict is None:
            return
        where = f"model {source.model_name} version {source.version} against {baseline.version_str}"
        if not verdict.passed:
            self.metrics.rollout_refusals.labels(source.model_name).inc()
            raise ModelLoadError(f"{where}: {verdict.describe()}")
        log.info("%s: %s", where, verdict.describe())

    def _check_golden_set(
        self, source: VersionSource, metadata: ExportMetadata | None, sessions: OnnxSessions
    ) -> None:
        """Refuse the version unless its golden set passes through the server's image path."""
        try:
            verdict = check_golden_set(source.directory, metadata, sessions)
        except InvalidGoldenSet as error:
            verdict = GoldenVerdict(0, 0.0, (f"unreadable golden set: {error}",))
        if verdict is None:
            log.warning(
                "model %s version %d has no golden set: its preprocessing is not checked",
                source.model_name,
                source.version,
            )
            return
        if not verdict.passed:
            self.metrics.golden_set_failures.labels(source.model_name).inc()
            raise ModelLoadError(verdict.describe())
        log.info("model %s version %d: %s", source.model_name, source.version, verdict.describe())

    def _warm_up(
        self, sessions: OnnxSessions, model_source: ModelSource, source: VersionSource
    ) -> None:
        """Run every batch size the batcher can form before the version serves.

        The first run of a shape pays graph and allocator set-up (on a GPU, cuDNN's algorithm
        search): without this, every rollout shows as a burst of p99 spikes.
        """
        sizes = list(self.settings.warmup_batch_sizes)
        if not sizes:
            batching = batching_settings(self.settings, model_source.spec, sessions.instances)
            sizes = list(range(1, max(1, batching.max_batch_size) + 1))
        started = time.monotonic()
        warmed = sessions.warm_up(sizes, self.settings.warmup_timeout_s)
        seconds = time.monotonic() - started
        log.info(
            "model %s version %d warmed up at batch sizes %s in %.2fs",
            source.model_name,
            source.version,
            _ranges(warmed),
            seconds,
        )
        if len(warmed) < len(sizes):
            log.warning(
                "model %s version %d: warm-up stopped after %.0fs (warmup_timeout_s); batch "
                "sizes %s stay cold until first used",
                source.model_name,
                source.version,
                self.settings.warmup_timeout_s,
                _ranges(sizes[len(warmed) :]),
            )

    def _reject(
        self, model_source: ModelSource, source: VersionSource, error: BaseException
    ) -> None:
        key = (source.model_name, source.version)
        previous = self._rejected.get(key)
        attempts = previous.attempts + 1 if previous is not None else 1
        delay = min(self.settings.load_retry_s * 2 ** (attempts - 1), MAX_LOAD_RETRY_S)
        log.error(
            "model %s version %d rejected, previous versions keep serving: %s (attempt %d; "
            "retried in %.0f s, or sooner when its files change)",
            source.model_name,
            source.version,
            error,
            attempts,
            delay,
        )
        self.metrics.model_load_failures.labels(source.model_name).inc()
        self._rejected[key] = _Rejection(
            _fingerprint(model_source, source), attempts, time.monotonic() + delay, str(error)
        )

    def _retire(self, model: ModelVersion, *, keep_info: bool = False) -> None:
        """Unload ``model`` once its requests finish; ``keep_info``: a reload of the same
        version took its place and owns its ``model_info`` series now."""
        log.info(
            "model %s version %d retired; unloading after in-flight requests",
            model.name,
            model.version,
        )
        if not keep_info:
            self.metrics.model_info.remove(
                model.name,
                model.version_str,
                model.sessions.providers[0],
                _precision(model.metadata),
            )
        task = asyncio.get_running_loop().create_task(model.unload())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def repository_index(self) -> list[VersionState]:
        """Every model the repository poll found, with its loaded, loading and refused versions.

        A loaded version is READY even when a later change to its files was refused (it serves
        what it loaded before); the refusal is its reason. Versions the policy left unloaded
        without trying are not listed, as in Triton.
        """
        index = []
        for name in sorted(set(self._models) | set(self._config_errors)):
            loaded = self._models.get(name, {})
            rejected = {v: r.reason for (n, v), r in self._rejected.items() if n == name}
            loading = {v for n, v in self._loading if n == name}
            config_error = self._config_errors.get(name)
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
        """Drain and unload everything (used at shutdown)."""
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


def _fingerprint(model_source: ModelSource, source: VersionSource) -> tuple:
    return (model_source.fingerprint, version_fingerprint(source))


def _precision(metadata: ExportMetadata | None) -> str:
    return (metadata.precision if metadata else None) or "unknown"


def _ranges(sizes: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"``: short log lines for 32 or 256 batch sizes."""
    runs: list[list[int]] = []
    for size in sizes:
        if runs and size == runs[-1][-1] + 1:
            runs[-1].append(size)
        else:
            runs.append([size])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"
