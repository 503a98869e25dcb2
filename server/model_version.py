"""One loaded model version: it checks a request against its graph, computes it and records
the outcome in its statistics, all in ``infer``.

Batching is added when the version loads (``start_batching`` wraps the sessions in a
``DynamicBatcher``), so neither the handlers nor the sessions see the batcher, and the batcher
sees no statistics. Leases keep a version loaded while requests hold it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from contracts.model_metadata import ModelMetadata
from server.batching import BatchingSettings, BatchObserver, BatchResult, DynamicBatcher
from server.errors import InvalidInput, ModelNotReady
from server.model_spec import TensorHeader
from server.onnx_sessions import OnnxSessions, TensorSpec
from server.repository import ModelSource, VersionSource
from server.statistics import CountingObserver, ModelStatistics
from server.types import Tensor

Submit = Callable[[dict[str, np.ndarray], float | None], Awaitable[BatchResult]]


def check_input(spec: TensorSpec, tensor: TensorHeader, max_batch_size: int) -> None:
    """Refuse a tensor whose datatype or shape the graph does not take."""
    if tensor.datatype != spec.datatype:
        raise InvalidInput(
            f"input {tensor.name!r}: datatype {tensor.datatype}, the model expects {spec.datatype}"
        )
    shape = tensor.shape
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input {tensor.name!r}: shape {list(shape)}, the model expects {list(spec.shape)}"
        )
    dims = zip(shape, spec.shape, strict=True)
    if max_batch_size > 0:
        if not 1 <= shape[0] <= max_batch_size:
            raise InvalidInput(
                f"input {tensor.name!r}: batch size {shape[0]} outside 1..{max_batch_size}"
            )
        dims = zip(shape[1:], spec.shape[1:], strict=True)
    for got, want in dims:
        if want >= 0 and got != want:
            raise InvalidInput(
                f"input {tensor.name!r}: shape {list(shape)}, the model expects {list(spec.shape)}"
            )


class ModelVersion:
    """A version ready to serve: its spec, sessions, labels, statistics and ``infer``."""

    def __init__(
        self,
        model: ModelSource,
        source: VersionSource,
        sessions: OnnxSessions,
        metadata: ModelMetadata | None,
        observe_queue: Callable[[float], None],
    ) -> None:
        """
        Args:
            model: the model directory read from the repository (spec and labels).
            source: this version's directory.
            sessions: its loaded and warmed-up onnxruntime sessions.
            metadata: its export metadata; its labels win over the model directory's.
            observe_queue: called with each answered request's queue time (a metric).
        """
        self.name = source.model_name
        self.version = source.version
        self.source = source
        self.spec = model.spec
        self.labels = metadata.labels if metadata and metadata.labels else model.labels
        self.metadata = metadata
        self.sessions = sessions
        self.stats = ModelStatistics()
        self.batching: BatchingSettings | None = None
        self._observe_queue = observe_queue
        self._submit: Submit | None = None
        self._batcher: DynamicBatcher | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._leases = 0
        self._submitted = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def max_batch_size(self) -> int:
        """The per-request limit from config.pbtxt (0: no batch dimension)."""
        return self.spec.max_batch_size

    @property
    def version_str(self) -> str:
        return str(self.version)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.sessions.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.sessions.outputs

    @property
    def upstream(self) -> int:
        """Requests holding this version that have not reached the batcher yet."""
        return self._leases - self._submitted

    async def start_batching(self, settings: BatchingSettings, observer: BatchObserver) -> None:
        """Put a dynamic batcher with one worker thread per session in front of the sessions."""
        self._executor = ThreadPoolExecutor(
            max_workers=self.sessions.instances,
            thread_name_prefix=f"{self.name}-{self.version}",
        )
        self._batcher = DynamicBatcher(
            self.sessions.run,
            settings,
            self._executor,
            CountingObserver(observer, self.stats),
            upstream=lambda: self.upstream,
        )
        await self._batcher.start()
        self.batching = settings
        self._submit = self._batcher.submit

    async def infer(
        self, inputs: Sequence[Tensor], deadline: float | None, received: float | None = None
    ) -> dict[str, np.ndarray]:
        """Check, compute and count one request; every output of the graph comes back.

        Args:
            deadline: ``time.monotonic()`` after which the request is not computed.
            received: when the request arrived (``time.monotonic()``), so the statistics
                include the work done before it reached the model (decoding images).

        Raises:
            InvalidInput, Overloaded, DeadlineExceeded, ModelNotReady, or the batch's failure;
            each is counted as a failed request.
        """
        received = time.monotonic() if received is None else received
        try:
            arrays = self._check(inputs)
            result = await self._compute(arrays, deadline)
        except BaseException:  # cancelled requests are failures in Triton's counts too
            self.stats.record_failure(time.monotonic() - received)
            raise
        rows = next(iter(arrays.values())).shape[0] if self.max_batch_size > 0 else 1
        self._observe_queue(result.queue_s)
        self.stats.record_success(time.monotonic() - received, rows, result)
        return result.outputs

    def _check(self, inputs: Sequence[Tensor]) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in self.inputs}
        given = {t.name: t for t in inputs}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise InvalidInput(f"unknown input(s) {unknown}; the model takes {sorted(specs)}")
        missing = sorted(set(specs) - set(given))
        if missing:
            raise InvalidInput(f"missing input(s) {missing}")
        for name, tensor in given.items():
            check_input(specs[name], tensor, self.max_batch_size)
        return {name: tensor.data for name, tensor in given.items()}

    async def _compute(self, arrays: dict[str, np.ndarray], deadline: float | None) -> BatchResult:
        if self._submit is None:
            raise ModelNotReady(f"model {self.name!r} version {self.version} is not started")
        self._submitted += 1
        try:
            return await self._submit(arrays, deadline)
        finally:
            self._submitted -= 1

    def acquire(self) -> None:
        self._leases += 1
        self._idle.clear()

    def release(self) -> None:
        self._leases -= 1
        if self._leases == 0:
            self._idle.set()

    async def unload(self) -> None:
        """Wait for the requests holding this version, then stop its batcher and threads."""
        await self._idle.wait()
        if self._batcher is not None:
            await self._batcher.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
