"""Training progress into the status of the Kubeflow TrainJob the trainer runs in.

Kubeflow Trainer (>= 2.2, controller feature gate ``TrainJobStatus``) injects three variables
into a TrainJob's trainer containers; the contract, from kubeflow/trainer
``docs/user-guides/trainjob-progress.md`` ("Option C: Raw HTTP") and
``pkg/runtime/framework/plugins/trainjobstatus``:

    KUBEFLOW_TRAINER_SERVER_URL      https://...:10443/apis/trainer.kubeflow.org/v1alpha1/
                                     namespaces/NS/trainjobs/NAME/status
    KUBEFLOW_TRAINER_SERVER_CA_CERT  path of the CA certificate that signs the endpoint
    KUBEFLOW_TRAINER_SERVER_TOKEN    path of a projected service-account token (a JWT that
                                     expires hourly and is rotated on disk: read at every POST)

Each update is one POST of ``{"trainerStatus": {"progressPercentage", "estimatedRemainingSeconds",
"metrics": [{"name", "value"}], "lastUpdatedTime"}}`` with ``Authorization: Bearer TOKEN``; the
controller writes it into ``.status.trainerStatus``. The guide asks clients to send at most one
update every 5 s and never to let reporting break training.

So the training loop only hands a snapshot over (``epoch_end`` takes a lock and returns); a
daemon thread sends the newest one, at most once per interval, with a short timeout. A slow or
unreachable endpoint costs the loop nothing: failures are counted, the first is logged with its
reason, and the run goes on. The HTTP client is the standard library's: the Kubeflow SDK's
``update_trainjob_status`` would do the same POST, but it brings the Kubernetes client, pydantic
and the Trainer and Katib API packages into the training image, and it sends on the caller's
thread.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

URL_ENV = "KUBEFLOW_TRAINER_SERVER_URL"
CA_CERT_ENV = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
TOKEN_ENV = "KUBEFLOW_TRAINER_SERVER_TOKEN"
# The guide's client-side limit; the controller also rate-limits (5 QPS, burst 10, per server).
MIN_INTERVAL_S = 5.0
# Per request; the status server itself times out reads after a few seconds.
TIMEOUT_S = 3.0
# trainerStatus.metrics[].name and .value are at most 64 characters (the TrainJob CRD).
MAX_METRIC_CHARS = 64


@dataclass(frozen=True)
class StatusEndpoint:
    """Where and how to POST: the injected URL, CA file and token file."""

    url: str
    ca_file: Path
    token_file: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> StatusEndpoint | None:
        """The endpoint the Trainer injected, or None outside a TrainJob (any variable unset)."""
        url, ca, token = (environ.get(k, "") for k in (URL_ENV, CA_CERT_ENV, TOKEN_ENV))
        if not (url and ca and token):
            return None
        return cls(url, Path(ca), Path(token))


@dataclass(frozen=True)
class ProgressSnapshot:
    """One update, as observed at ``observed_at`` (Unix time)."""

    percentage: int
    remaining_seconds: int | None
    metrics: tuple[tuple[str, str], ...]
    observed_at: float

    def to_payload(self) -> dict[str, Any]:
        """The request body: ``{"trainerStatus": {...}}`` in the TrainJob API's field names."""
        status: dict[str, Any] = {
            "progressPercentage": self.percentage,
            "metrics": [{"name": name, "value": value} for name, value in self.metrics],
            "lastUpdatedTime": datetime.fromtimestamp(self.observed_at, UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
        }
        if self.remaining_seconds is not None:
            status["estimatedRemainingSeconds"] = self.remaining_seconds
        return {"trainerStatus": status}


def metric_value(value: float) -> str:
    """A metric as the API wants it: a short string (NaN and infinities spelt out)."""
    return f"{value:.6g}"[:MAX_METRIC_CHARS]


class TrainJobProgress:
    """Reports the phases' progress to the TrainJob, from rank 0, off the training thread.

    Progress is counted in epochs over the planned phases: the position after epoch E of phase
    P is the epochs of the phases before P plus E, so an early stop moves straight on to the
    next phase's share. The remaining time is the mean epoch time of the current phase in this
    process times the planned epochs left.

    Args:
        endpoint: where to send (``StatusEndpoint.from_env``).
        plan: (phase name, planned epochs) in the order the phases run.
        min_interval_s: at most one POST per this many seconds; newer snapshots replace a
            pending one.
        timeout_s: per request (connect, TLS, response).
        clock: Unix time, for the observation timestamps.
    """

    def __init__(
        self,
        endpoint: StatusEndpoint,
        plan: Sequence[tuple[str, int]],
        *,
        min_interval_s: float = MIN_INTERVAL_S,
        timeout_s: float = TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint = endpoint
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._epochs = {name: max(0, epochs) for name, epochs in plan}
        self._offsets: dict[str, int] = {}
        self._planned = 0
        for name, epochs in self._epochs.items():
            self._offsets[name] = self._planned
            self._planned += epochs
        self._epoch_seconds: dict[str, list[float]] = {}
        self._pending: ProgressSnapshot | None = None
        self._last: ProgressSnapshot | None = None
        self._wake = threading.Condition()
        self._closing = False
        self._finished = False
        self.sent = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="trainjob-progress", daemon=True)
        self._thread.start()

    # ---- called by the training loop (must not block) ------------------------------------

    def epoch_end(
        self,
        *,
        phase: str,
        epoch: int,
        train_loss: float,
        val_accuracy: float,
        epoch_seconds: float,
    ) -> None:
        """Record a finished epoch and hand the resulting snapshot to the sender."""
        self._epoch_seconds.setdefault(phase, []).append(max(0.0, epoch_seconds))
        position = self._offsets.get(phase, 0) + epoch
        durations = self._epoch_seconds[phase]
        remaining = max(0, self._planned - position)
        self._offer(
            ProgressSnapshot(
                percentage=self._percentage(position),
                remaining_seconds=round(remaining * sum(durations) / len(durations)),
                metrics=(
                    ("train_loss", metric_value(train_loss)),
                    ("val_accuracy", metric_value(val_accuracy)),
                    ("phase", phase[:MAX_METRIC_CHARS]),
                    ("epoch", f"{epoch}/{self._epochs.get(phase, epoch)}"),
                ),
                observed_at=self._clock(),
            )
        )

    def training_done(self) -> None:
        """Every phase finished (early stops included): 100 %, nothing remaining; ``close``
        then still sends it."""
        with self._wake:
            metrics = self._last.metrics if self._last is not None else ()
            self._pending = ProgressSnapshot(100, 0, metrics, self._clock())
            self._finished = True
            self._wake.notify_all()

    def close(self) -> None:
        """Stop the sender. After ``training_done`` the last update is still sent (after the
        interval: waiting at most ``min_interval_s + timeout_s``); otherwise (a stop signal or
        an error: the trainer has seconds left) a pending update is dropped. Logs how many
        updates failed, if any did."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        wait_s = self.min_interval_s + self.timeout_s + 1.0 if self._finished else 1.0
        self._thread.join(timeout=wait_s)
        if self.failures:
            log.info(
                "TrainJob progress: %d of %d updates failed",
                self.failures,
                self.failures + self.sent,
            )

    # ---- the sender thread -------------------------------------------------------------------

    def _percentage(self, position: int) -> int:
        if self._planned <= 0:
            return 0
        return max(0, min(100, math.floor(100 * position / self._planned)))

    def _offer(self, snapshot: ProgressSnapshot) -> None:
        with self._wake:
            self._pending = snapshot
            self._last = snapshot
            self._wake.notify_all()

    def _run(self) -> None:
        next_send = 0.0
        while True:
            with self._wake:
                while True:
                    if self._closing and (self._pending is None or not self._finished):
                        return
                    if self._pending is None:
                        self._wake.wait()
                        continue
                    # Waiting out the interval: a newer snapshot replaces the pending one, and
                    # the interval holds for the final update too.
                    wait = next_send - time.monotonic()
                    if wait <= 0:
                        break
                    self._wake.wait(timeout=wait)
                snapshot, self._pending = self._pending, None
            next_send = time.monotonic() + self.min_interval_s
            self._send(snapshot)

    def _send(self, snapshot: ProgressSnapshot) -> None:
        try:
            post_status(self.endpoint, snapshot.to_payload(), self.timeout_s)
        except Exception as error:  # reporting must never stop training
            self.failures += 1
            if self.failures == 1:
                log.warning(
                    "TrainJob progress: POST to %s failed (%s); training goes on, later "
                    "failures are only counted",
                    self.endpoint.url,
                    describe(error),
                )
        else:
            self.sent += 1


def post_status(endpoint: StatusEndpoint, payload: dict[str, Any], timeout_s: float) -> None:
    """POST ``payload`` with a freshly read token and CA (both rotate on disk).

    Raises:
        OSError: the files cannot be read, the connection, TLS or the response failed
            (``urllib.error.URLError`` and ``HTTPError`` are OSErrors).
    """
    token = endpoint.token_file.read_text().strip()
    context = ssl.create_default_context(cafile=str(endpoint.ca_file))
    # The status server is a cluster Service: a proxy from the environment must not take it.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    request = urllib.request.Request(
        endpoint.url,
        data=json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with opener.open(request, timeout=timeout_s) as response:
        response.read()


def describe(error: BaseException) -> str:
    """The reason without the token: the status code and the server's message, or the error."""
    read = getattr(error, "read", None)
    code = getattr(error, "code", None)
    if code is not None and callable(read):
        try:
            body = read(512).decode(errors="replace").strip()
        except OSError:
            body = ""
        return f"HTTP {code} {body}".strip()
    return f"{type(error).__name__}: {error}"


def trainjob_progress_from_env(
    environ: Mapping[str, str], plan: Sequence[tuple[str, int]]
) -> TrainJobProgress | None:
    """A reporter when the process runs in a TrainJob with progress enabled, else None."""
    endpoint = StatusEndpoint.from_env(environ)
    if endpoint is None:
        return None
    log.info("TrainJob progress: reporting to %s", endpoint.url)
    return TrainJobProgress(endpoint, plan)
