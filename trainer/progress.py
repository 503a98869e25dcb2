"""Progress display and structured log lines that suit both a terminal and a cluster.

On a terminal the epoch loop shows a tqdm bar. Under Kubernetes (stderr is a pipe) a bar
redraws itself hundreds of times into the log store, so there is no bar at all: the loop
writes one structured line per event instead, as logfmt (``event=epoch_end phase=head
loss=0.512``) or, with ``TRAINER_LOG_FORMAT=json``, as one JSON object per line for log
pipelines that parse JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any, Protocol, TypeVar

from tqdm import tqdm

LOG_FORMAT_ENV = "TRAINER_LOG_FORMAT"
LOG_FORMATS = ("plain", "json")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class ProgressIterable(Protocol[T_co]):
    """What ``progress`` returns: an iterable with a postfix and a ``close``."""

    def __iter__(self) -> Iterator[T_co]: ...

    def set_postfix(self, **kv: Any) -> None: ...

    def close(self) -> None: ...


class _SilentProgress(Iterable[T]):
    """Iterates without drawing anything; keeps the last postfix for callers that read it."""

    def __init__(self, iterable: Iterable[T], total: int, desc: str) -> None:
        self._iterable = iterable
        self.total = total
        self.desc = desc
        self.postfix: dict[str, Any] = {}

    def __iter__(self) -> Iterator[T]:
        return iter(self._iterable)

    def set_postfix(self, **kv: Any) -> None:
        self.postfix = dict(kv)

    def close(self) -> None:
        pass


class _BarProgress(Iterable[T]):
    """A tqdm bar on stderr; ``set_postfix`` formats floats compactly and does not force a
    redraw (tqdm's own ``refresh=True`` default redraws on every step)."""

    def __init__(self, iterable: Iterable[T], total: int, desc: str, stream: IO[str]) -> None:
        self._bar = tqdm(
            iterable,
            total=total,
            desc=desc,
            file=stream,
            dynamic_ncols=True,
            leave=False,
            unit="batch",
        )

    def __iter__(self) -> Iterator[T]:
        return iter(self._bar)

    def set_postfix(self, **kv: Any) -> None:
        self._bar.set_postfix({k: _compact(v) for k, v in kv.items()}, refresh=False)

    def close(self) -> None:
        self._bar.close()


def progress(
    iterable: Iterable[T],
    *,
    total: int,
    desc: str,
    enabled: bool | None = None,
) -> ProgressIterable[T]:
    """Wrap ``iterable`` in a progress bar when a person is watching, else in nothing visible.

    Args:
        iterable: the batches (or anything else) to iterate over.
        total: number of items, for the bar's percentage and ETA.
        desc: short label shown before the bar, e.g. ``"head 1/3"``.
        enabled: ``True`` forces the bar, ``False`` suppresses it (ranks other than 0),
            ``None`` draws it only when stderr is a terminal.

    Returns:
        An iterable with ``set_postfix(**kv)`` (shown on the bar, kept silently otherwise)
        and ``close()``.
    """
    if total < 0:
        raise ValueError(f"progress total must be >= 0, got {total}")
    stream = sys.stderr
    if enabled is None:
        enabled = _is_tty(stream)
    if enabled:
        return _BarProgress(iterable, total, desc, stream)
    return _SilentProgress(iterable, total, desc)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def log_event(logger: logging.Logger, event: str, **fields: Any) -> None:
    """Write one structured INFO line: ``event=NAME key=value ...``.

    The message is logfmt; the handler installed by ``configure_logging`` renders the same
    record as one JSON object when the JSON format is selected, so a log pipeline gets typed
    fields rather than a string to parse.

    Args:
        logger: where to log (the caller's module logger).
        event: what happened, snake_case, e.g. ``epoch_end``.
        **fields: values to attach; numbers, strings, booleans, None, lists and dicts.
    """
    if not event or any(c.isspace() for c in event):
        raise ValueError(f"event name must be a non-empty word without spaces, got {event!r}")
    if not logger.isEnabledFor(logging.INFO):
        return
    logger.info(
        format_logfmt(event, fields),
        extra={"structured_event": event, "structured_fields": fields},
    )


def format_logfmt(event: str, fields: Mapping[str, Any]) -> str:
    """Render ``event`` and ``fields`` as one logfmt line."""
    parts = [f"event={_logfmt_value(event)}"]
    parts.extend(f"{key}={_logfmt_value(value)}" for key, value in _flatten(fields).items())
    return " ".join(parts)


def _flatten(fields: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys (``lr.head=0.001``), the logfmt idiom, so log queries
    can filter on them without parsing JSON inside a value."""
    flat: dict[str, Any] = {}
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _compact(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def _jsonable(value: Any) -> Any:
    """Plain JSON types only: numpy/torch scalars become numbers, NaN and inf become strings
    (strict JSON has no NaN), anything else unknown becomes its ``str``."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        # numpy scalars and 0-d arrays/tensors; .item() on a CUDA tensor is a host sync,
        # which is fine once per logged event.
        return _jsonable(value.item())
    return str(value)


def _logfmt_value(value: Any) -> str:
    value = _jsonable(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list) and value and all(_is_plain_scalar(v) for v in value):
        # a list of simple values reads best comma-joined: groups=head,layer4
        return ",".join(_logfmt_value(v) for v in value)
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if text and not any(c.isspace() or c in '"=\\' for c in text):
        return text
    return json.dumps(text)


def _is_plain_scalar(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value) and not any(c.isspace() or c in '",=\\' for c in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, then either the event and
    its fields (records from ``log_event``) or ``message``."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, "structured_event", None)
        if event is not None:
            payload["event"] = event
            for key, value in getattr(record, "structured_fields", {}).items():
                payload.setdefault(key, _jsonable(value))
        else:
            payload["message"] = record.getMessage()
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, separators=(",", ":"))


class PlainFormatter(logging.Formatter):
    """``2026-01-31T12:00:00.123Z INFO trainer.finetune.loop event=epoch_end ...``: UTC, one
    line."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc_iso(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _utc_iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class _BarAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes through ``tqdm.write`` on a terminal so log lines do not tear a live bar."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _is_tty(self.stream):
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def resolve_log_format(fmt: str | None) -> str:
    """``fmt`` if given, else ``$TRAINER_LOG_FORMAT``, else ``plain``; validated."""
    chosen = fmt if fmt is not None else os.environ.get(LOG_FORMAT_ENV, "plain")
    chosen = chosen.strip().lower()
    if chosen not in LOG_FORMATS:
        source = "log format" if fmt is not None else LOG_FORMAT_ENV
        raise ValueError(f"{source}: expected one of {', '.join(LOG_FORMATS)}, got {chosen!r}")
    return chosen


def configure_logging(
    level: int | str = logging.INFO,
    fmt: str | None = None,
    *,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send all log records to stderr as plain or JSON lines; safe to call more than once.

    Replaces the handler a previous call installed on the root logger (and only that one).

    Args:
        level: logging level name or number for the root logger.
        fmt: ``"plain"`` or ``"json"``; ``None`` reads ``TRAINER_LOG_FORMAT`` (default plain).
        stream: where to write; stderr by default (stdout stays free for machine output).

    Returns:
        The installed handler.

    Raises:
        ValueError: unknown format or level, naming the bad value.
    """
    chosen = resolve_log_format(fmt)
    if isinstance(level, str):
        numeric = logging.getLevelName(level.strip().upper())
        if not isinstance(numeric, int):
            raise ValueError(f"log level: unknown level {level!r}")
        level = numeric
    handler = _BarAwareHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else PlainFormatter())
    handler.set_name("trainer-structured")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "trainer-structured":
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
