"""Loading one model version, off the event loop and cancellable between steps.

``VersionLoader`` is built by the composition root (``server.app``) and used by the model
manager, which decides *which* versions to load; the loader does everything that loading *one*
version takes: the plan (what is on file about it: a crashed load, a verdict, the rollout
gate's baseline), the loading marker, the steps in a thread of its own
(``server.load_thread``), and the batcher in front of the loaded sessions.

The steps: onnxruntime sessions, config.pbtxt checked against the graph, the export metadata,
the warm-up (one batch size at a time), the version's own golden set, and the rollout gate
(the version against the golden set of the newest older version on disk). Between steps, and
between batch sizes and golden images, the load stops when it was cancelled: a server shutting
down does not finish a warm-up nobody will use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contracts.golden_set import GOLDEN_FILENAME, InvalidGoldenSet, golden_dir
from contracts.holdout_set import HOLDOUT_DIRNAME, HOLDOUT_FILENAME, InvalidHoldoutSet
from contracts.model_metadata import ModelMetadata
from contracts.repository_layout import CONFIG_FILENAME
from server.batching import BatchingSettings
from server.errors import ModelLoadError
from server.golden_set import (
    GoldenVerdict,
    JudgedVersion,
    RolloutVerdict,
    check_golden_set,
    check_holdout,
    check_rollout,
)
from server.load_thread import LoadControl, run_in_daemon_thread
from server.metrics import ServerMetrics
from server.model_spec import ModelSpec, complete_from_graph, graph_contradictions
from server.model_version import ModelVersion
from server.onnx_sessions import OnnxSessions, SessionSettings
from server.repository import ModelSource, VersionSource, read_metadata, version_fingerprint
from server.thread_plan import ThreadPlan
from server.version_records import Files, RefusedVersion, RolloutRecord, VersionRecords, utc_now

log = logging.getLogger(__name__)

# Whether this process refused a version for good (the manager's rejections): such a version
# never served, so it is no baseline for the rollout gate.
RefusedHere = Callable[[VersionSource], bool]
# How long stop() waits for cancelled loads to leave onnxruntime (one kernel, or the rest of
# a session's creation, which cannot be interrupted).
STOP_LOADS_WAIT_S = 5.0


@dataclass(frozen=True)
class LoadSettings:
    """The server settings loading a version takes (``ServerConfig``'s fields of these names)."""

    providers: str
    instances: int
    graph_optimization: str
    warmup_batch_sizes: tuple[int, ...]
    warmup_timeout_s: float
    rollout_max_accuracy_drop: float
    allow_versions_without_golden_set: bool
    max_batch_size: int | None
    max_queue_delay_us: int | None
    max_queue_size: int
    max_queued_bytes: int


def batching_settings(settings: LoadSettings, spec: ModelSpec, instances: int) -> BatchingSettings:
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


@dataclass(frozen=True)
class LoadPlan:
    """What the manager decided before the load: the gate's baseline and a verdict on file.

    Attributes:
        baseline: the newest older version on disk with a golden set that is not refused;
            None when there is none.
        verdict: the verdict already on file for these files (the gate is not run again);
            never a refusal that still holds (those are refused without loading).
        files: the version's files now (``version_fingerprint``).
        started_at: when the load began (``time.monotonic``), for its log line.
    """

    baseline: VersionSource | None
    verdict: RolloutRecord | None
    files: Files
    started_at: float


@dataclass(frozen=True)
class LoadedVersion:
    """What a load builds: the version's sessions, its ``model.json`` and its agreed spec."""

    sessions: OnnxSessions
    metadata: ModelMetadata | None
    spec: ModelSpec


class VersionLoader:
    """Plans, loads, warms up and checks versions, and starts their batchers."""

    def __init__(
        self,
        settings: LoadSettings,
        threads: ThreadPlan,
        metrics: ServerMetrics,
        records: VersionRecords,
    ) -> None:
        self.settings = settings
        self.threads = threads
        self.metrics = metrics
        self.records = records
        # (model, version) of the loads in progress, for the repository index.
        self.loading: set[tuple[str, int]] = set()
        # Loads whose thread may still run: in progress, or cancelled and not yet stopped.
        self._loads: set[LoadControl] = set()

    def plan(
        self, model_source: ModelSource, source: VersionSource, refused_here: RefusedHere
    ) -> LoadPlan:
        """What is on file about the version, and the gate's baseline (runs in a thread).

        Raises:
            RefusedVersion: a server died loading these files, or their verdict refuses them.
        """
        started_at = time.monotonic()
        files = version_fingerprint(source)
        crashed = self.records.crashed_load(source, files)
        if crashed is not None:
            raise RefusedVersion(crashed.describe())
        max_drop = self.settings.rollout_max_accuracy_drop
        verdict = None
        on_file = self.records.read_verdict(source, files)
        if on_file is not None:
            verdict, path = on_file
            if verdict.refuses_under(max_drop):
                raise RefusedVersion(
                    f"{verdict.describe()} (verdict in {path}; delete it to judge again)"
                )
            if not verdict.accepted:
                log.info(
                    "model %s version %d: refused with an allowed drop of %.3f, judged again "
                    "with rollout_max_accuracy_drop %.3f",
                    source.model_name,
                    source.version,
                    verdict.max_drop,
                    max_drop,
                )
                verdict = None
        baseline = self._rollout_baseline(model_source, source, refused_here)
        return LoadPlan(baseline, verdict, files, started_at)

    def _rollout_baseline(
        self, model_source: ModelSource, source: VersionSource, refused_here: RefusedHere
    ) -> VersionSource | None:
        """The newest older version on disk with a golden set that is not refused.

        On disk, loaded or not: after a restart nothing older is loaded, and a version judged
        only against loaded ones would go live unjudged. A version refused by its verdict, by
        this process or skipped after a crash never served, so it is passed over: judged
        against a version as bad, a bad version would pass.
        """
        max_drop = self.settings.rollout_max_accuracy_drop
        for older in reversed(model_source.available):
            if older.version >= source.version:
                continue
            if not (golden_dir(older.directory) / GOLDEN_FILENAME).is_file():
                continue
            if refused_here(older):
                continue
            files = version_fingerprint(older)
            on_file = self.records.read_verdict(older, files)
            if on_file is not None and on_file[0].refuses_under(max_drop):
                continue
            if self.records.crashed_load(older, files) is not None:
                continue
            return older
        return None

    async def load(
        self, model_source: ModelSource, source: VersionSource, plan: LoadPlan
    ) -> LoadedVersion:
        """Run the steps in a thread of their own, with the version's loading marker on file.

        Raises:
            LoadCancelled: ``stop()`` stopped it.
            RefusedVersion: the rollout gate refused it (its verdict is written).
            ModelLoadError: any other reason not to serve it.
            asyncio.CancelledError: the awaiting task was cancelled; the thread is told to
                stop within a step.
        """
        key = (source.model_name, source.version)
        self.loading.add(key)
        control = LoadControl()
        self._loads.add(control)
        marker = self.records.mark_loading(source, plan.files)
        try:
            try:
                return await run_in_daemon_thread(
                    functools.partial(self._run_steps, model_source, source, plan, control),
                    name=f"load-{source.model_name}-{source.version}",
                )
            finally:
                # Before a rejection takes the files' fingerprint. A load that ended, failed
                # or was cancelled by a shutdown is no crash.
                marker.release()
                self.loading.discard(key)
        except asyncio.CancelledError:
            control.cancel()  # its thread stops within a step; stop() waits for that only
            log.warning("model %s version %d: load cancelled", source.model_name, source.version)
            raise
        finally:
            if control.finished.is_set():
                self._loads.discard(control)

    async def start_serving(
        self,
        model_source: ModelSource,
        source: VersionSource,
        loaded: LoadedVersion,
        plan: LoadPlan,
    ) -> ModelVersion:
        """The loaded version with its batcher started and its metric series set."""
        name, version = source.model_name, str(source.version)
        sessions, metadata = loaded.sessions, loaded.metadata
        model = ModelVersion(
            dataclasses.replace(model_source, spec=loaded.spec),
            source,
            sessions,
            metadata,
            self.metrics.queue_seconds.labels(name, version).observe,
        )
        settings = batching_settings(self.settings, model_source.spec, sessions.instances)
        await model.start_batching(settings, self.metrics.observer(name, version))
        self.metrics.model_loads.labels(name).inc()
        self.metrics.model_info.labels(
            name, version, sessions.providers[0], precision_label(metadata)
        ).set(1)
        log.info(
            "model %s version %s ready in %.2fs (provider %s, batching %s)",
            name,
            version,
            time.monotonic() - plan.started_at,
            sessions.providers[0],
            settings,
        )
        return model

    async def stop(self) -> None:
        """Cancel every load and wait until their threads are out of onnxruntime.

        A cancelled load leaves its step within one kernel (its runs are terminated), but a
        thread still inside onnxruntime when the process exits makes it abort in onnxruntime's
        destructors. Waiting is bounded: a session still being created cannot be stopped.
        """
        for control in self._loads:
            control.cancel()
        deadline = time.monotonic() + STOP_LOADS_WAIT_S
        while not all(control.finished.is_set() for control in self._loads):
            if time.monotonic() >= deadline:
                log.warning(
                    "a cancelled load is still inside onnxruntime after %.0f s; exiting anyway",
                    STOP_LOADS_WAIT_S,
                )
                break
            await asyncio.sleep(0.01)
        self._loads.clear()

    def _run_steps(
        self,
        model_source: ModelSource,
        source: VersionSource,
        plan: LoadPlan,
        control: LoadControl,
    ) -> LoadedVersion:
        """Every step of a load; each one first checks whether ``control`` was cancelled.

        Raises:
            LoadCancelled: ``control.cancel()`` was called.
            RefusedVersion: the rollout gate refused it (its verdict is written).
            ModelLoadError: any other reason not to serve it.
        """
        try:
            return self._steps(model_source, source, plan, control)
        except ModelLoadError:
            control.checkpoint()  # a run stopped by cancel() fails: that is a cancellation
            raise
        finally:
            control.finished.set()

    def _steps(
        self,
        model_source: ModelSource,
        source: VersionSource,
        plan: LoadPlan,
        control: LoadControl,
    ) -> LoadedVersion:
        checkpoint = control.checkpoint
        checkpoint()
        sessions = OnnxSessions(source.onnx_path, self._session_settings())
        control.started(sessions)
        # Before the warm-up: a batch size the graph cannot take would fail there, less clearly.
        spec = agreed_spec(model_source, source, sessions)
        metadata = read_metadata(source, sessions.custom_metadata)
        loaded = LoadedVersion(sessions, metadata, spec)
        self._warm_up(sessions, model_source, source, checkpoint)
        self._check_golden_set(source, metadata, sessions, checkpoint)
        checkpoint()
        if plan.verdict is not None:
            log.info(
                "model %s version %d: %s (verdict on file, not judged again)",
                source.model_name,
                source.version,
                plan.verdict.describe(),
            )
        else:
            self._judge_rollout(model_source, source, loaded, plan, checkpoint)
        return loaded

    def _session_settings(self) -> SessionSettings:
        return SessionSettings(
            providers=self.settings.providers,
            instances=self.settings.instances,
            intra_op_threads=self.threads.intra_op_threads,
            inter_op_threads=self.threads.inter_op_threads,
            allow_spinning=self.threads.allow_spinning,
            graph_optimization=self.settings.graph_optimization,
        )

    def _judge_rollout(
        self,
        model_source: ModelSource,
        source: VersionSource,
        loaded: LoadedVersion,
        plan: LoadPlan,
        checkpoint: Callable[[], None],
    ) -> None:
        """The rollout gate: refuse a version that does worse than the one it would replace,
        on that one's golden set and on this one's holdout set of reviewed production images;
        write the verdict either way."""
        record = RolloutRecord(
            model=source.model_name,
            version=source.version,
            accepted=True,
            reason="no older version with a golden set on disk: nothing to compare with",
            max_drop=self.settings.rollout_max_accuracy_drop,
            files=plan.files,
            decided_at=utc_now(),
        )
        baseline = plan.baseline
        if baseline is not None:
            judged = self._judge_on_golden_set(model_source, source, loaded, baseline, checkpoint)
            if judged is None:
                return  # no verdict: the next load judges it again
            record = dataclasses.replace(record, **judged)
            on_holdout = self._judge_on_holdout(model_source, source, loaded, baseline, checkpoint)
            if on_holdout is not None:
                record = dataclasses.replace(
                    record,
                    accepted=record.accepted and on_holdout.passed,
                    reason=(
                        f"{record.reason}; against version {baseline.version}: "
                        f"{on_holdout.describe()}"
                    ),
                    holdout_baseline_accuracy=on_holdout.baseline_accuracy,
                    holdout_accuracy=on_holdout.accuracy,
                    holdout_images=on_holdout.images,
                )
        where = self.records.write_verdict(source, record)
        kept = f" (verdict in {where})" if where is not None else ""
        if not record.accepted:
            self.metrics.rollout_refusals.labels(source.model_name).inc()
            raise RefusedVersion(f"{record.describe()}{kept}")
        log.info(
            "model %s version %d: %s%s", source.model_name, source.version, record.describe(), kept
        )

    def _judge_on_golden_set(
        self,
        model_source: ModelSource,
        source: VersionSource,
        loaded: LoadedVersion,
        baseline: VersionSource,
        checkpoint: Callable[[], None],
    ) -> dict[str, Any] | None:
        """The verdict's fields from ``baseline``'s golden set; None when it cannot be read and
        that is allowed (the version serves unjudged)."""
        metadata = loaded.metadata
        labels = _labels(metadata, model_source)
        max_drop = self.settings.rollout_max_accuracy_drop
        try:
            verdict = check_rollout(
                baseline.directory, metadata, loaded.sessions, labels, max_drop, checkpoint
            )
        except InvalidGoldenSet as error:
            problem = f"cannot be checked on version {baseline.version}'s golden set: {error}"
            if not self.settings.allow_versions_without_golden_set:
                raise ModelLoadError(
                    f"{problem} (allow_versions_without_golden_set serves it unchecked)"
                ) from None
            log.warning(
                "model %s version %d: rollout check skipped (allowed): %s",
                source.model_name,
                source.version,
                problem,
            )
            return None
        if verdict is None:
            reason = f"version {baseline.version}'s golden set has no labelled images"
            return {"reason": reason, "baseline_version": baseline.version}
        return {
            "accepted": verdict.passed,
            "reason": f"against version {baseline.version}: {verdict.describe()}",
            "baseline_version": baseline.version,
            "baseline_accuracy": verdict.baseline_accuracy,
            "accuracy": verdict.accuracy,
            "images": verdict.images,
        }

    def _judge_on_holdout(
        self,
        model_source: ModelSource,
        source: VersionSource,
        loaded: LoadedVersion,
        baseline: VersionSource,
        checkpoint: Callable[[], None],
    ) -> RolloutVerdict | None:
        """This version and ``baseline`` on this version's holdout set; None without one.

        The baseline runs in sessions of its own, opened for this and dropped after: it may
        not be loaded (after a restart nothing older is), and one thread is enough for a few
        hundred images.

        Raises:
            ModelLoadError: the holdout set cannot be read (a broken version, not a verdict).
        """
        if not (source.directory / HOLDOUT_DIRNAME / HOLDOUT_FILENAME).is_file():
            return None
        settings = dataclasses.replace(
            self._session_settings(), instances=1, intra_op_threads=1, allow_spinning=False
        )
        sessions = OnnxSessions(baseline.onnx_path, settings)
        baseline_metadata = read_metadata(baseline, sessions.custom_metadata)
        metadata = loaded.metadata
        candidate = JudgedVersion(metadata, loaded.sessions, _labels(metadata, model_source))
        previous = JudgedVersion(
            baseline_metadata, sessions, _labels(baseline_metadata, model_source)
        )
        try:
            return check_holdout(
                source.directory,
                candidate,
                previous,
                self.settings.rollout_max_accuracy_drop,
                checkpoint,
            )
        except InvalidHoldoutSet as error:
            raise ModelLoadError(
                f"model {source.model_name} version {source.version}: its holdout set cannot "
                f"be read: {error}"
            ) from None

    def _check_golden_set(
        self,
        source: VersionSource,
        metadata: ModelMetadata | None,
        sessions: OnnxSessions,
        checkpoint: Callable[[], None],
    ) -> None:
        """Refuse the version unless its golden set passes through the server's image path.

        A version without a golden set (or with one that cannot be read) is refused too,
        unless ``allow_versions_without_golden_set``: nothing else shows that the server
        decodes its images as the trainer did.
        """
        allowed = self.settings.allow_versions_without_golden_set
        try:
            verdict = check_golden_set(source.directory, metadata, sessions, checkpoint=checkpoint)
        except InvalidGoldenSet as error:
            if allowed:
                log.warning(
                    "model %s version %d: its golden set is unreadable (%s); served unchecked "
                    "(allow_versions_without_golden_set)",
                    source.model_name,
                    source.version,
                    error,
                )
                return
            verdict = GoldenVerdict(0, 0.0, (f"unreadable golden set: {error}",))
        if verdict is None:
            if not allowed:
                raise ModelLoadError(
                    f"model {source.model_name} version {source.version} has no golden set, so "
                    "nothing shows the server decodes its images as the trainer did "
                    "(allow_versions_without_golden_set serves it unchecked)"
                )
            log.warning(
                "model %s version %d has no golden set: its preprocessing is not checked "
                "(allow_versions_without_golden_set)",
                source.model_name,
                source.version,
            )
            return
        if not verdict.passed:
            self.metrics.golden_set_failures.labels(source.model_name).inc()
            raise ModelLoadError(verdict.describe())
        log.info("model %s version %d: %s", source.model_name, source.version, verdict.describe())

    def _warm_up(
        self,
        sessions: OnnxSessions,
        model_source: ModelSource,
        source: VersionSource,
        checkpoint: Callable[[], None],
    ) -> None:
        """Run every batch size the batcher can form before the version serves.

        The first run of a shape pays graph and allocator set-up (on a GPU, cuDNN's algorithm
        search): without this, every rollout shows as a burst of p99 spikes. One size at a
        time, so that a cancelled load stops within one batch.
        """
        sizes = list(self.settings.warmup_batch_sizes)
        if not sizes:
            batching = batching_settings(self.settings, model_source.spec, sessions.instances)
            sizes = list(range(1, max(1, batching.max_batch_size) + 1))
        started = time.monotonic()
        deadline = started + self.settings.warmup_timeout_s
        warmed: list[int] = []
        for size in sizes:
            checkpoint()
            done = sessions.warm_up([size], deadline - time.monotonic())
            if not done:
                break
            warmed += done
        log.info(
            "model %s version %d warmed up at batch sizes %s in %.2fs",
            source.model_name,
            source.version,
            _ranges(warmed),
            time.monotonic() - started,
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


def _ranges(sizes: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"``: short log lines for 32 or 256 batch sizes."""
    runs: list[list[int]] = []
    for size in sizes:
        if runs and size == runs[-1][-1] + 1:
            runs[-1].append(size)
        else:
            runs.append([size])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def precision_label(metadata: ModelMetadata | None) -> str:
    """The ``precision`` label of a version's ``model_info`` series."""
    return (metadata.precision if metadata else None) or "unknown"


def _labels(metadata: ModelMetadata | None, model_source: ModelSource) -> tuple[str, ...]:
    """A version's class names: its ``model.json``'s, else the model directory's."""
    return metadata.labels if metadata and metadata.labels else model_source.labels
