"""Outcome bookkeeping shared by the handlers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from contracts.repository_layout import MAX_MODEL_NAME_LENGTH
from server.errors import ModelNotFound, ServerError, shown
from server.metrics import ServerMetrics

# Versions are int64 numbers in Triton: 19 digits at most.
MAX_VERSION_CHARS = 19


class RequestRecord:
    """Labels of one request, filled in as the handler learns them.

    Until the model version is resolved the labels stay empty: names sent by clients must not
    become label values, or a client could grow the metrics without bound.
    """

    def __init__(self, model: str = "", version: str = "") -> None:
        self.model = model
        self.version = version
        self.started = time.monotonic()


def check_model_reference(name: str, version: str) -> None:
    """Refuse a model name or version no repository can hold, before it is looked up, so
    the error names it cut short (``server.errors.shown``).

    Raises:
        ModelNotFound: the name is longer than the repository's name rule allows, or the
            version longer than a number can be.
    """
    if len(name) > MAX_MODEL_NAME_LENGTH:
        raise ModelNotFound(f"unknown model {shown(name)}")
    if len(version) > MAX_VERSION_CHARS:
        raise ModelNotFound(f"model {shown(name)} has no version {shown(version)}")


@contextlib.contextmanager
def recorded(
    metrics: ServerMetrics, record: RequestRecord, deadline: float | None
) -> Iterator[RequestRecord]:
    """Count the request's outcome and, on success, its end-to-end latency."""
    metrics.inflight.inc()
    try:
        yield record
    except ServerError as error:
        metrics.requests.labels(record.model, record.version, error.reason).inc()
        raise
    except asyncio.CancelledError:
        expired = deadline is not None and time.monotonic() >= deadline
        outcome = "deadline" if expired else "cancelled"
        metrics.requests.labels(record.model, record.version, outcome).inc()
        raise
    except Exception:
        metrics.requests.labels(record.model, record.version, "internal").inc()
        raise
    else:
        metrics.requests.labels(record.model, record.version, "success").inc()
        metrics.request_seconds.labels(record.model, record.version).observe(
            time.monotonic() - record.started
        )
    finally:
        metrics.inflight.dec()
