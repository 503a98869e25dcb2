"""Training progress as Prometheus gauges, for a training Job that a Prometheus scrapes.

A scraped job wants "where is it and is it still moving": the phase, epoch and step, the
latest loss, validation accuracy and throughput, and when they last changed (alert on a stale
``trainer_last_update_timestamp_seconds`` to catch a hung job). Everything lives in a
registry of its own, never the process-global one, so two trainers in one process (tests)
do not collide.
"""

from __future__ import annotations

import math
import threading
import time
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, start_http_server

MAX_PORT = 65535


class TrainingTelemetry:
    """Serves ``/metrics`` with the trainer's progress gauges; does nothing when ``port`` is None.

    Metrics (all gauges):

    - ``trainer_phase{phase="..."}``: 1 for the phase now running, 0 for phases that ran before.
    - ``trainer_epoch``: epoch within the current phase, 1-based.
    - ``trainer_step``: the step counter the training loop reports.
    - ``trainer_train_loss``: latest training loss.
    - ``trainer_val_accuracy_ratio``: latest validation accuracy, a fraction 0-1.
    - ``trainer_images_per_second``: latest training throughput.
    - ``trainer_last_update_timestamp_seconds``: Unix time of the last ``update``.

    Args:
        port: TCP port to serve on; 0 lets the OS choose (read it back from ``.port``); None
            disables the endpoint and makes ``update`` a no-op.
        registry: where to register the gauges; a fresh ``CollectorRegistry`` by default.
        addr: address to bind; all interfaces by default so a Kubernetes scrape can reach it.

    Raises:
        ValueError: the port is outside 0-65535.
        OSError: the port cannot be bound (already in use, not permitted).
    """

    def __init__(
        self,
        port: int | None,
        registry: CollectorRegistry | None = None,
        *,
        addr: str = "0.0.0.0",  # a scraped pod must listen beyond loopback
    ) -> None:
        self.port: int | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._phases: set[str] = set()
        self.enabled = port is not None
        self.registry = registry if registry is not None else CollectorRegistry()
        if port is None:
            return
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= MAX_PORT:
            raise ValueError(f"metrics port must be an integer in 0-{MAX_PORT}, got {port!r}")
        self._phase = Gauge(
            "trainer_phase",
            "1 for the training phase now running, 0 for phases that ran before.",
            ["phase"],
            registry=self.registry,
        )
        self._epoch = Gauge(
            "trainer_epoch", "Epoch within the current phase, 1-based.", registry=self.registry
        )
        self._step = Gauge(
            "trainer_step", "Step counter reported by the training loop.", registry=self.registry
        )
        self._loss = Gauge("trainer_train_loss", "Latest training loss.", registry=self.registry)
        self._accuracy = Gauge(
            "trainer_val_accuracy_ratio",
            "Latest validation accuracy as a fraction 0-1.",
            registry=self.registry,
        )
        self._throughput = Gauge(
            "trainer_images_per_second",
            "Latest training throughput in images per second.",
            registry=self.registry,
        )
        self._updated = Gauge(
            "trainer_last_update_timestamp_seconds",
            "Unix time of the last progress update; stale means the job is stuck.",
            registry=self.registry,
        )
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = int(self._server.server_port)

    def update(  # noqa: PLR0913  keyword-only gauges, each optional
        self,
        phase: str | None = None,
        epoch: int | None = None,
        step: int | None = None,
        loss: float | None = None,
        val_accuracy: float | None = None,
        images_per_second: float | None = None,
    ) -> None:
        """Set the gauges for the arguments given; None leaves a gauge as it was.

        Raises:
            ValueError: a value of the wrong kind (a non-numeric value, an empty phase name,
                an accuracy outside 0-1), naming the argument.
        """
        if not self.enabled:
            return
        with self._lock:
            if phase is not None:
                if not isinstance(phase, str) or not phase:
                    raise ValueError(f"phase must be a non-empty string, got {phase!r}")
                for seen in self._phases - {phase}:
                    self._phase.labels(phase=seen).set(0)
                self._phases.add(phase)
                self._phase.labels(phase=phase).set(1)
            if epoch is not None:
                self._epoch.set(_number("epoch", epoch))
            if step is not None:
                self._step.set(_number("step", step))
            if loss is not None:
                self._loss.set(_number("loss", loss))
            if val_accuracy is not None:
                accuracy = _number("val_accuracy", val_accuracy)
                if not 0.0 <= accuracy <= 1.0:
                    raise ValueError(f"val_accuracy must be a fraction 0-1, got {accuracy}")
                self._accuracy.set(accuracy)
            if images_per_second is not None:
                self._throughput.set(_number("images_per_second", images_per_second))
            self._updated.set(time.time())

    def close(self) -> None:
        """Stop serving; idempotent. Gauges keep their last values in the registry."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> TrainingTelemetry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _number(name: str, value: object) -> float:
    """A float from an int, float, numpy or 0-d tensor value; NaN is kept (a diverged loss
    should show up as NaN on the dashboard, not disappear)."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        value = item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if math.isinf(number) and name != "loss":
        raise ValueError(f"{name} must be finite, got {number}")
    return number
