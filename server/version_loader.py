"""Loading one model version, off the event loop and cancellable between steps.

The steps: onnxruntime sessions, config.pbtxt checked against the graph, the export metadata,
the warm-up (one batch size at a time), the version's own golden set, and the rollout gate
(the version against the golden set of the newest older version on disk). Between steps, and
between batch sizes and golden images, the load stops when it was cancelled: a server shutting
down does not finish a warm-up nobody will use.

The load runs in a daemon thread of its own, not in the loop's default executor: a cancelled
load keeps its thread until the step it is in ends (onnxruntime cannot be interrupted), and
``asyncio.run`` joins the default executor's threads at exit, so a SIGTERM during a warm-up
would otherwise wait for the whole warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from contracts.golden_set import InvalidGoldenSet
from contracts.model_metadata import ModelMetadata
from contracts.repository_layout import CONFIG_FILENAME
from server.batching import BatchingSettings
from server.config import ServerConfig
from server.errors import ModelLoadError
from server.golden_set import GoldenVerdict, check_golden_set, check_rollout
from server.metrics import ServerMetrics
from server.model_spec import ModelSpec, complete_from_graph, graph_contradictions
from server.onnx_sessions import OnnxSessions, SessionSettings
from server.repository import ModelSource, VersionSource, read_metadata
from server.thread_plan import ThreadPlan
from server.version_records import Files, RefusedVersion, RolloutRecord, VersionRecords, utc_now

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoadCancelled(Exception):  # noqa: N818 (names of the domain)
    """The load was cancelled between two steps (the server is shutting down)."""


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


async def run_in_daemon_thread(function: Callable[[], T], name: str) -> T:
    """``await function()`` run in a new daemon thread that nobody joins.

    Cancelling the await returns at once; the thread finishes its step on its own, and a
    process exiting meanwhile does not wait for it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (function(), None)
        except BaseException as error:  # delivered to the awaiting task, which decides
            outcome = (None, error)
        # The loop may be closed already (the process is exiting): nobody waits any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, *outcome)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future


class LoadControl:
    """How the event loop stops one load running in its thread, and learns that it ended."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()
        self.finished = threading.Event()
        self._sessions: OnnxSessions | None = None

    def cancel(self) -> None:
        """Stop at the next step; a run in progress (a warm-up batch) stops within a kernel."""
        self._cancelled.set()
        sessions = self._sessions
        if sessions is not None:
            sessions.terminate()

    def checkpoint(self) -> None:
        """Raises LoadCancelled once ``cancel()`` was called (in the load's thread)."""
        if self._cancelled.is_set():
            raise LoadCancelled("cancelled")

    def started(self, sessions: OnnxSessions) -> None:
        """The load's sessions exist: from now on ``cancel()`` terminates their runs."""
        self._sessions = sessions
        self.checkpoint()  # a cancel() that came before the line above found no sessions


@dataclass(frozen=True)
class LoadPlan:
    """What the manager decided before the load: the gate's baseline and a verdict on file.

    Attributes:
        baseline: the newest older version on disk with a golden set that is not refused;
            None when there is none.
        verdict: the verdict already on file for these files (the gate is not run again);
            never a refusal that still holds (the manager refuses those without loading).
        files: the version's files now (``version_fingerprint``).
    """

    baseline: VersionSource | None
    verdict: RolloutRecord | None
    files: Files


@dataclass(frozen=True)
class LoadedVersion:
    sessions: OnnxSessions
    metadata: ModelMetadata | None
    spec: ModelSpec


class VersionLoader:
    """Loads, warms up and checks versions; runs in a load's own thread."""

    def __init__(
        self,
        settings: ServerConfig,
        threads: ThreadPlan,
        metrics: ServerMetrics,
        records: VersionRecords,
    ) -> None:
        self.settings = settings
        self.threads = threads
        self.metrics = metrics
        self.records = records

    def load(
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
            return self._load(model_source, source, plan, control)
        except ModelLoadError:
            control.checkpoint()  # a run stopped by cancel() fails: that is a cancellation
            raise
        finally:
            control.finished.set()

    def _load(
        self,
        model_source: ModelSource,
        source: VersionSource,
        plan: LoadPlan,
        control: LoadControl,
    ) -> LoadedVersion:
        checkpoint = control.checkpoint
        checkpoint()
        settings = SessionSettings(
            providers=self.settings.providers,
            instances=self.settings.instances,
            intra_op_threads=self.threads.intra_op_threads,
            inter_op_threads=self.threads.inter_op_threads,
            allow_spinning=self.threads.allow_spinning,
            graph_optimization=self.settings.graph_optimization,
        )
        sessions = OnnxSessions(source.onnx_path, settings)
        control.started(sessions)
        # Before the warm-up: a batch size the graph cannot take would fail there, less clearly.
        spec = agreed_spec(model_source, source, sessions)
        metadata = read_metadata(source, sessions.custom_metadata)
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
            self._judge_rollout(model_source, source, metadata, sessions, plan, checkpoint)
        return LoadedVersion(sessions, metadata, spec)

    def _judge_rollout(  # noqa: PLR0913  one step of load, given what the load has built
        self,
        model_source: ModelSource,
        source: VersionSource,
        metadata: ModelMetadata | None,
        sessions: OnnxSessions,
        plan: LoadPlan,
        checkpoint: Callable[[], None],
    ) -> None:
        """The rollout gate: refuse a version that does worse than the one it would replace
        on that one's golden set; write the verdict either way."""
        max_drop = self.settings.rollout_max_accuracy_drop
        record = RolloutRecord(
            model=source.model_name,
            version=source.version,
            accepted=True,
            reason="no older version with a golden set on disk: nothing to compare with",
            max_drop=max_drop,
            files=plan.files,
            decided_at=utc_now(),
        )
        baseline = plan.baseline
        if baseline is not None:
            labels = metadata.labels if metadata and metadata.labels else model_source.labels
            try:
                verdict = check_rollout(
                    baseline.directory, metadata, sessions, labels, max_drop, checkpoint
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
                return  # no verdict: the next load judges it again
            if verdict is None:
                reason = f"version {baseline.version}'s golden set has no labelled images"
                record = dataclasses.replace(
                    record, reason=reason, baseline_version=baseline.version
                )
            else:
                record = dataclasses.replace(
                    record,
                    accepted=verdict.passed,
                    reason=f"against version {baseline.version}: {verdict.describe()}",
                    baseline_version=baseline.version,
                    baseline_accuracy=verdict.baseline_accuracy,
                    accuracy=verdict.accuracy,
                    images=verdict.images,
                )
        where = self.records.write_verdict(source, record)
        kept = f" (verdict in {where})" if where is not None else ""
        if not record.accepted:
            self.metrics.rollout_refusals.labels(source.model_name).inc()
            raise RefusedVersion(f"{record.describe()}{kept}")
        log.info(
            "model %s version %d: %s%s", source.model_name, source.version, record.describe(), kept
        )

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
