"""What the export says: one line per step with its duration, third-party chatter kept quiet.

``export_step`` times one step of ``export_checkpoint`` and logs ``event=export_step
step=NAME seconds=S ...`` when it completes (a failing step logs nothing: its error says what
went wrong). ``quiet_third_party`` silences the INFO chatter of the ONNX exporter's libraries
(hundreds of ``onnx_ir`` / ``onnxscript`` lines per export) and onnxruntime's warnings about
its own internals, for the export only; warnings the user can act on come from the trainer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import onnxruntime as ort

from trainer.progress import log_event

log = logging.getLogger(__name__)

#: Loggers of the exporter's libraries; children (``onnx_ir.passes...``) follow their parent.
THIRD_PARTY_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "onnxruntime")
#: onnxruntime's default C++ log severity (0 verbose .. 4 fatal). It has no getter, so this
#: is what ``quiet_third_party`` restores.
ORT_DEFAULT_SEVERITY = 2
_ORT_ERROR = 3
# onnxruntime.quantization logs its advice ("consider pre-processing", ...) on the root
# logger, so it cannot be silenced by name; a filter on the root logger drops it.
_ORT_QUANTIZATION_PATH = "onnxruntime/quantization"


class _DropQuantizationAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return record.levelno >= logging.ERROR or _ORT_QUANTIZATION_PATH not in path


@contextmanager
def quiet_third_party(level: int = logging.WARNING) -> Iterator[None]:
    """Raise the third-party loggers to ``level`` and onnxruntime's to errors; restore after.

    The previous levels of the Python loggers are restored exactly; onnxruntime's severity is
    set back to its default (``ORT_DEFAULT_SEVERITY``).
    """
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    previous = [logger.level for logger in loggers]
    advice = _DropQuantizationAdvice()
    root = logging.getLogger()
    for logger in loggers:
        logger.setLevel(max(level, logger.level))
    root.addFilter(advice)
    ort.set_default_logger_severity(_ORT_ERROR)
    try:
        yield
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)
        root.removeFilter(advice)
        for logger, old in zip(loggers, previous, strict=True):
            logger.setLevel(old)


@contextmanager
def export_step(name: str, **facts: Any) -> Iterator[dict[str, Any]]:
    """Time one export step; on success log one line with its duration and ``facts``.

    Yields:
        A dict the step may add facts to (sizes, differences) for its line.
    """
    started = time.perf_counter()
    details: dict[str, Any] = dict(facts)
    yield details
    log_event(
        log, "export_step", step=name, seconds=round(time.perf_counter() - started, 2), **details
    )
