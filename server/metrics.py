"""Prometheus metrics of the server, registered on an explicit CollectorRegistry.

Latencies are histograms in seconds so percentiles aggregate across replicas; counters end in
``_total``. The registry is passed in (never the process-global one) so tests and several
servers in one process stay apart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.batching import BatchObserver
from server.prediction_monitor import VersionMetrics

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROBABILITY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# inference_requests_total's outcome values (server.handlers.common.recorded): "success",
# each ServerError.reason, "cancelled" (the caller left) and "internal".
OUTCOMES = (
    "success",
    "invalid",
    "not_found",
    "unavailable",
    "rejected",
    "too_large",
    "deadline",
    "cancelled",
    "unauthenticated",
    "internal",
)


MODEL_LABELS = ("model", "version")
GRPC_LABELS = ("grpc_service", "grpc_method", "grpc_type")
# The HTTP/REST listener's twins of the grpc_server_* metrics; route is the matched pattern
# (/v2/models/{model}/infer), never the client's path.
HTTP_LABELS = ("method", "route")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: the ``ServerMetrics`` attribute that holds it, its type, name, help text,
    label names and (histograms) buckets."""

    attribute: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    documentation: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None

    def create(self, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
        """The metric, registered on ``registry``."""
        if self.kind is Histogram:
            assert self.buckets is not None, f"{self.name}: a histogram needs its buckets"
            return Histogram(
                self.name, self.documentation, self.labels, buckets=self.buckets, registry=registry
            )
        return self.kind(self.name, self.documentation, self.labels, registry=registry)


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "requests",
        Counter,
        "inference_requests_total",
        "Inference requests (ModelInfer and Classify) by outcome.",
        (*MODEL_LABELS, "outcome"),
    ),
    MetricSpec(
        "request_seconds",
        Histogram,
        "inference_request_duration_seconds",
        "End-to-end handler latency of successful inference requests.",
        MODEL_LABELS,
        LATENCY_BUCKETS,
    ),
    MetricSpec(
        "queue_seconds",
        Histogram,
        "inference_queue_duration_seconds",
        "Time a request waited in the batcher's queue.",
        MODEL_LABELS,
        LATENCY_BUCKETS,
    ),
    MetricSpec(
        "preprocess_seconds",
        Histogram,
        "inference_preprocess_duration_seconds",
        "Image decoding and resizing per Classify request.",
        MODEL_LABELS,
        LATENCY_BUCKETS,
    ),
    MetricSpec(
        "compute_seconds",
        Histogram,
        "inference_compute_duration_seconds",
        "onnxruntime time per executed batch.",
        MODEL_LABELS,
        LATENCY_BUCKETS,
    ),
    MetricSpec(
        "batch_size",
        Histogram,
        "inference_batch_size",
        "Rows per executed batch.",
        MODEL_LABELS,
        BATCH_BUCKETS,
    ),
    MetricSpec(
        "inferences",
        Counter,
        "inference_rows_total",
        "Rows (images) computed; a batch of n counts n.",
        MODEL_LABELS,
    ),
    MetricSpec(
        "expired",
        Counter,
        "inference_expired_in_queue_total",
        "Requests dropped before compute because their deadline had passed.",
        MODEL_LABELS,
    ),
    MetricSpec(
        "queue_depth",
        Gauge,
        "inference_queue_depth",
        "Requests waiting in the batcher's queue.",
        MODEL_LABELS,
    ),
    MetricSpec(
        "inflight", Gauge, "inference_inflight_requests", "Inference RPCs being handled now."
    ),
    MetricSpec(
        "cpu_budget",
        Gauge,
        "server_cpu_budget",
        "CPUs the server sizes its threads by: min(CPU affinity, cgroup CPU quota).",
    ),
    MetricSpec(
        "model_loads",
        Counter,
        "model_loads_total",
        "Model versions loaded and warmed up.",
        ("model",),
    ),
    MetricSpec(
        "model_load_failures",
        Counter,
        "model_load_failures_total",
        "Model versions rejected because they failed to load or warm up.",
        ("model",),
    ),
    MetricSpec(
        "rollout_refusals",
        Counter,
        "model_rollout_refusals_total",
        "New model versions refused because they lost more than rollout_max_accuracy_drop "
        "of accuracy on the golden set of the version they would replace.",
        ("model",),
    ),
    MetricSpec(
        "golden_set_failures",
        Counter,
        "model_golden_set_failures_total",
        "Model versions refused because the server's decode, resize and graph did not "
        "reproduce their golden set (contracts.golden_set).",
        ("model",),
    ),
    MetricSpec(
        "model_info",
        Gauge,
        "model_info",
        "1 for each loaded model version, labelled with its execution provider.",
        ("model", "version", "provider", "precision"),
    ),
    MetricSpec(
        "grpc_started",
        Counter,
        "grpc_server_started_total",
        "RPCs started on the server.",
        GRPC_LABELS,
    ),
    MetricSpec(
        "grpc_handled",
        Counter,
        "grpc_server_handled_total",
        "RPCs completed on the server, by status code.",
        (*GRPC_LABELS, "grpc_code"),
    ),
    MetricSpec(
        "grpc_seconds",
        Histogram,
        "grpc_server_handling_seconds",
        "RPC handling time on the server.",
        GRPC_LABELS,
        LATENCY_BUCKETS,
    ),
    MetricSpec(
        "http_handled",
        Counter,
        "http_server_requests_total",
        "HTTP/REST requests answered, by status code.",
        (*HTTP_LABELS, "code"),
    ),
    MetricSpec(
        "http_seconds",
        Histogram,
        "http_server_request_duration_seconds",
        "HTTP/REST request handling time on the server.",
        HTTP_LABELS,
        LATENCY_BUCKETS,
    ),
    # What the model predicts in production (server.prediction_monitor feeds these).
    MetricSpec(
        "predictions",
        Counter,
        "classification_predictions_total",
        "Classify answers by predicted class (class names beyond the cap count as other).",
        (*MODEL_LABELS, "label"),
    ),
    MetricSpec(
        "top_probability",
        Histogram,
        "classification_top_probability",
        "Top probability of each Classify answer.",
        MODEL_LABELS,
        PROBABILITY_BUCKETS,
    ),
    MetricSpec(
        "abstentions",
        Counter,
        "classification_abstentions_total",
        "Classify answers marked abstained (top probability under the threshold).",
        MODEL_LABELS,
    ),
    MetricSpec(
        "drift",
        Gauge,
        "classification_class_drift_psi",
        "Population stability index of the recent predicted-class distribution against "
        "the val split's at export (NaN until the window fills or without a reference).",
        MODEL_LABELS,
    ),
    MetricSpec(
        "load_test_predictions",
        Counter,
        "classification_load_test_predictions_total",
        "Classify answers to requests marked as a load test (x-load-test metadata), kept "
        "out of the prediction, abstention and drift metrics and the capture.",
        MODEL_LABELS,
    ),
    MetricSpec(
        "captures",
        Counter,
        "classification_captures_total",
        "Images captured for review, by reason (abstained, low_margin, random).",
        ("reason",),
    ),
    MetricSpec(
        "captures_dropped",
        Counter,
        "classification_captures_dropped_total",
        "Captures dropped, by cause (rate_limited, queue_full, write_error).",
        ("cause",),
    ),
)


class ServerMetrics:
    """Every metric the server exports: one attribute per entry of ``METRICS``, registered
    in that order, and the GPU collector when NVML sees a GPU."""

    requests: Counter
    request_seconds: Histogram
    queue_seconds: Histogram
    preprocess_seconds: Histogram
    compute_seconds: Histogram
    batch_size: Histogram
    inferences: Counter
    expired: Counter
    queue_depth: Gauge
    inflight: Gauge
    cpu_budget: Gauge
    model_loads: Counter
    model_load_failures: Counter
    rollout_refusals: Counter
    golden_set_failures: Counter
    model_info: Gauge
    grpc_started: Counter
    grpc_handled: Counter
    grpc_seconds: Histogram
    http_handled: Counter
    http_seconds: Histogram
    predictions: Counter
    top_probability: Histogram
    abstentions: Counter
    drift: Gauge
    load_test_predictions: Counter
    captures: Counter
    captures_dropped: Counter

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        for spec in METRICS:
            setattr(self, spec.attribute, spec.create(registry))
        gpu = GpuCollector()
        if gpu.available:
            registry.register(gpu)

    def forget_version(self, model: str, version: str, class_labels: Iterable[str]) -> None:
        """Drop every series of a retired version (``remove()``), so that neither /metrics
        nor this process keeps one set per version ever served.

        Args:
            class_labels: the ``label`` values its predictions were counted under.
        """
        per_version = (
            self.request_seconds,
            self.queue_seconds,
            self.preprocess_seconds,
            self.compute_seconds,
            self.batch_size,
            self.inferences,
            self.expired,
            self.queue_depth,
            self.top_probability,
            self.abstentions,
            self.drift,
            self.load_test_predictions,
        )
        for metric in per_version:
            metric.remove(model, version)
        for outcome in OUTCOMES:
            self.requests.remove(model, version, outcome)
        for label in set(class_labels):
            self.predictions.remove(model, version, label)

    def observer(self, model: str, version: str) -> BatchObserver:
        return _BatchMetrics(self, model, version)

    def prediction_metrics(self, model: str, version: str) -> VersionMetrics:
        """The production-prediction metrics of one version, bound to its labels."""
        return VersionMetrics(
            count_prediction=lambda label: self.predictions.labels(model, version, label).inc(),
            observe_top_probability=self.top_probability.labels(model, version).observe,
            count_abstention=self.abstentions.labels(model, version).inc,
            set_drift=self.drift.labels(model, version).set,
            count_load_test=self.load_test_predictions.labels(model, version).inc,
        )


class _BatchMetrics(BatchObserver):
    def __init__(self, metrics: ServerMetrics, model: str, version: str) -> None:
        self._depth = metrics.queue_depth.labels(model, version)
        self._batch = metrics.batch_size.labels(model, version)
        self._compute = metrics.compute_seconds.labels(model, version)
        self._rows = metrics.inferences.labels(model, version)
        self._expired = metrics.expired.labels(model, version)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def batch_done(self, batch_size: int, request_count: int, compute_s: float) -> None:
        self._batch.observe(batch_size)
        self._compute.observe(compute_s)
        self._rows.inc(batch_size)

    def expired(self) -> None:
        self._expired.inc()


class GpuCollector(Collector):
    """GPU utilisation and memory from NVML, when pynvml and a GPU are present."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml  # optional; not a dependency

            pynvml.nvmlInit()
            self._count = pynvml.nvmlDeviceGetCount()
            self._nvml = pynvml
        except Exception:  # no library, no driver or no GPU: no GPU metrics
            self._count = 0

    @property
    def available(self) -> bool:
        return self._nvml is not None and self._count > 0

    def collect(self) -> Iterable[GaugeMetricFamily]:
        utilisation = GaugeMetricFamily(
            "gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=["gpu"]
        )
        used = GaugeMetricFamily("gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("gpu_memory_total_bytes", "GPU memory size.", labels=["gpu"])
        for index in range(self._count):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:  # a GPU that vanished must not break /metrics
                log.debug("NVML query failed for GPU %d", index, exc_info=True)
                continue
            utilisation.add_metric([str(index)], rates.gpu / 100.0)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
        return [utilisation, used, total]
