"""onnxruntime on CPU for the export's own checks: sessions, feeds, accuracy and latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contracts.graph_signature import INPUT_NAME, LOGITS_NAME, UINT8_NHWC
from trainer.export.images import ImageSet


def cpu_session(path: Path) -> ort.InferenceSession:
    """A CPU session with onnxruntime's default (full) graph optimisations."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def to_feed(
    images: np.ndarray, input_format: str, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """uint8 NHWC images in the graph's input format (normalised float NCHW when asked)."""
    if input_format == UINT8_NHWC:
        return np.ascontiguousarray(images, dtype=np.uint8)
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


@dataclass(frozen=True)
class GraphInput:
    """What the graph's input takes: its format, and the normalisation applied before a
    ``float32-nchw`` graph (a ``uint8-nhwc`` graph normalises inside)."""

    input_format: str
    mean: Sequence[float]
    std: Sequence[float]

    def feed(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC images as this input takes them."""
        return to_feed(images, self.input_format, self.mean, self.std)


def run_logits(
    session: ort.InferenceSession,
    images: np.ndarray,
    graph_input: GraphInput,
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """Logits for uint8 NHWC images, in batches."""
    chunks = []
    for start in range(0, len(images), batch_size):
        feed = graph_input.feed(images[start : start + batch_size])
        chunks.append(session.run([LOGITS_NAME], {INPUT_NAME: feed})[0])
    return np.concatenate(chunks).astype(np.float32)


def top1_accuracy(session: ort.InferenceSession, data: ImageSet, graph_input: GraphInput) -> float:
    """Fraction of ``data`` whose arg-max logit is the true class (0..1)."""
    logits = run_logits(session, data.images, graph_input)
    return float(np.mean(np.argmax(logits, axis=1) == data.labels))


def median_latency_seconds(
    session: ort.InferenceSession, feed: np.ndarray, *, warmup: int = 2, runs: int = 10
) -> float:
    """Median wall time of one ``session.run`` on ``feed``."""
    for _ in range(warmup):
        session.run(None, {INPUT_NAME: feed})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: feed})
        times.append(time.perf_counter() - start)
    return statistics.median(times)
