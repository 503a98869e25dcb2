"""The server's settings: one frozen, typed object.

Precedence, lowest first: defaults < ``--config`` YAML file < ``SERVER_*`` environment
variables < command-line flags, read by ``contracts.settings.SettingsLoader``. Unknown keys and
values of the wrong type are errors that name the setting and where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.settings import SettingError, SettingsLoader
from server.errors import ConfigError

ENV_PREFIX = "SERVER_"
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
GRAPH_OPTIMIZATION_CHOICES = ("disable", "basic", "extended", "all")
# "auto": spin only when the budget is the whole host; "on"/"off" force onnxruntime's intra-
# and inter-op spinning either way.
SPINNING_CHOICES = ("auto", "on", "off")
# "thread": decode in the server's threads; "process": in worker processes that are killed at
# decode_timeout_s (server.decode_processes).
DECODE_ISOLATION_CHOICES = ("thread", "process")
MIB = 1024 * 1024


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of the server. Each field's ``help`` is also its --help text."""

    model_repository: Path = field(
        default=Path("models"), metadata=_doc("Triton-layout model repository directory.")
    )
    model_name: str | None = field(
        default=None,
        metadata=_doc("Serve only this model (default: every model in the repository)."),
    )
    host: str = field(
        default="0.0.0.0", metadata=_doc("Address the gRPC, HTTP/REST and health ports bind to.")
    )
    grpc_port: int = field(default=8001, metadata=_doc("gRPC port (0: pick a free one)."))
    http_port: int = field(
        default=8000,
        metadata=_doc(
            "Open Inference Protocol over HTTP/REST (KServe v2, Triton's REST API) and image "
            "classify, in the gRPC server's process (0: pick one; -1: off)."
        ),
    )
    metrics_port: int = field(
        default=8002, metadata=_doc("Prometheus /metrics port (0: pick one; -1: disabled).")
    )
    max_batch_size: int | None = field(
        default=None,
        metadata=_doc("Largest batch the dynamic batcher forms (default: config.pbtxt's)."),
    )
    max_queue_delay_us: int | None = field(
        default=None,
        metadata=_doc(
            "How long the batcher waits to fill a batch, in microseconds "
            "(default: config.pbtxt's dynamic_batching)."
        ),
    )
    max_queue_size: int = field(
        default=512,
        metadata=_doc("Requests waiting per model version; beyond it: RESOURCE_EXHAUSTED."),
    )
    instances: int = field(
        default=1, metadata=_doc("onnxruntime sessions per model version, running in parallel.")
    )
    providers: str = field(
        default="auto",
        metadata=_doc(
            "Execution providers: auto (CUDA if a GPU works, else CPU), cpu, cuda, tensorrt."
        ),
    )
    intra_op_threads: int = field(
        default=0,
        metadata=_doc(
            "onnxruntime intra-op threads per session (0: the pod's CPU budget, from the cgroup "
            "quota and CPU affinity, divided by instances)."
        ),
    )
    inter_op_threads: int = field(
        default=0, metadata=_doc("onnxruntime inter-op threads per session (0: one).")
    )
    ort_spinning: str = field(
        default="auto",
        metadata=_doc(
            "onnxruntime intra- and inter-op thread spinning: auto (on only when the CPU budget "
            "is every host core and the intra-op threads leave one of them free for the event "
            "loop), on, off."
        ),
    )
    graph_optimization: str = field(
        default="all", metadata=_doc("onnxruntime graph optimisation: disable|basic|extended|all.")
    )
    warmup_batch_sizes: tuple[int, ...] = field(
        default=(),
        metadata=_doc(
            "Batch sizes run once per session before a version serves (empty: every size the "
            "batcher can form, 1 to max_batch_size)."
        ),
    )
    warmup_timeout_s: float = field(
        default=120.0,
        metadata=_doc("Longest warm-up per version (0: none); sizes left then stay cold (logged)."),
    )
    poll_interval_s: float = field(
        default=5.0, metadata=_doc("Seconds between repository polls for new versions (0: off).")
    )
    drain_delay_s: float = field(
        default=1.0,
        metadata=_doc("After SIGTERM, keep serving this long with health NOT_SERVING."),
    )
    grace_period_s: float = field(
        default=30.0, metadata=_doc("After SIGTERM, time allowed to finish accepted requests.")
    )
    tls_cert: Path | None = field(default=None, metadata=_doc("PEM server certificate (TLS)."))
    tls_key: Path | None = field(default=None, metadata=_doc("PEM server private key (TLS)."))
    tls_client_ca: Path | None = field(
        default=None, metadata=_doc("PEM CA bundle; when set, clients must present a cert (mTLS).")
    )
    tls_client_allowed_names: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Comma-separated names: with mTLS, a client certificate is accepted only when one "
            "of its subject alternative names of type DNS or URI (its common name when it has "
            "none) is listed; others get UNAUTHENTICATED, health excepted (default: empty, any "
            "certificate tls_client_ca signed)."
        ),
    )
    auth_token_file: Path | None = field(
        default=None,
        metadata=_doc(
            "File of the bearer tokens every RPC but health must carry one of: one per line, "
            "blank lines and # comments ignored; read again within a second of a change."
        ),
    )
    max_message_bytes: int = field(
        default=64 * MIB,
        metadata=_doc(
            "Largest gRPC message received or sent, in bytes; grpc refuses a larger one from "
            "its length prefix, before receiving it (docs/server.md, Limits)."
        ),
    )
    max_inflight_input_bytes: int = field(
        default=512 * MIB,
        metadata=_doc(
            "Estimated memory of ModelInfer inputs converted and in flight at once, reserved "
            "before any is converted; beyond it: RESOURCE_EXHAUSTED."
        ),
    )
    max_image_bytes: int = field(
        default=32 * MIB, metadata=_doc("Largest encoded image accepted by Classify, in bytes.")
    )
    max_image_pixels: int = field(
        default=50_000_000, metadata=_doc("Largest decoded image (width*height) accepted.")
    )
    max_image_aspect: float = field(
        default=32.0,
        metadata=_doc(
            "Largest ratio of an image's longer to its shorter side (its resize target's long "
            "side is resize_size times this at most)."
        ),
    )
    max_images_per_request: int = field(
        default=64, metadata=_doc("Most images in one Classify request.")
    )
    max_pending_images: int = field(
        default=256,
        metadata=_doc("Images waiting for or in the decode pool; beyond it: RESOURCE_EXHAUSTED."),
    )
    max_concurrent_rpcs: int = field(
        default=1024,
        metadata=_doc("RPCs (streams included) handled at once; beyond it: RESOURCE_EXHAUSTED."),
    )
    max_concurrent_streams: int = field(
        default=128, metadata=_doc("HTTP/2 streams one client connection may open at once.")
    )
    max_queued_bytes: int = field(
        default=256 * MIB,
        metadata=_doc(
            "Bytes of inputs waiting in one version's batch queue; beyond it: RESOURCE_EXHAUSTED."
        ),
    )
    stream_idle_timeout_s: float = field(
        default=60.0,
        metadata=_doc("A bidi stream with no request for this long is ended (0: never)."),
    )
    stream_max_duration_s: float = field(
        default=3600.0, metadata=_doc("A bidi stream is ended after this long (0: never).")
    )
    max_health_watches: int = field(
        default=100,
        metadata=_doc(
            "grpc.health.v1 Watch streams open at once (health is exempt from auth and from "
            "max_concurrent_rpcs); beyond it: RESOURCE_EXHAUSTED."
        ),
    )
    health_watch_max_s: float = field(
        default=300.0,
        metadata=_doc("A health Watch stream is ended (OK) after this long; clients watch again."),
    )
    keepalive_time_s: float = field(
        default=60.0,
        metadata=_doc("The server pings a connection with calls open after this long idle."),
    )
    keepalive_timeout_s: float = field(
        default=20.0,
        metadata=_doc("A connection whose keepalive ping is unanswered this long is closed."),
    )
    max_connection_idle_s: float = field(
        default=300.0,
        metadata=_doc("A connection with no call for this long is closed (GOAWAY; 0: never)."),
    )
    max_connection_age_s: float = field(
        default=600.0,
        metadata=_doc(
            "A connection is closed (GOAWAY) after this long, give or take a tenth, so clients "
            "reconnect and new replicas get traffic (0: never)."
        ),
    )
    max_connection_age_grace_s: float = field(
        default=3600.0,
        metadata=_doc(
            "Calls still open on a connection closed for its age may finish within this long "
            "(as long as stream_max_duration_s, so age never ends a stream sooner; 0: no limit)."
        ),
    )
    metrics_host: str | None = field(
        default=None, metadata=_doc("Address the metrics port binds to (default: host).")
    )
    metrics_timeout_s: float = field(
        default=10.0,
        metadata=_doc(
            "Socket timeout of a metrics connection: reading the request and writing the answer."
        ),
    )
    health_port: int = field(
        default=-1,
        metadata=_doc(
            "Plaintext port serving only grpc.health.v1 (the same status as the gRPC port), "
            "for probes that cannot speak TLS such as the kubelet's (0: pick one; -1: off)."
        ),
    )
    load_retry_s: float = field(
        default=10.0,
        metadata=_doc(
            "First retry of a version that failed to load, in seconds; doubles per failure up "
            "to 600. A change to any of its files retries it at the next poll."
        ),
    )
    preprocess_workers: int = field(
        default=0, metadata=_doc("Threads decoding and resizing images (0: the CPU budget).")
    )
    max_decode_memory_mb: int = field(
        default=1024,
        metadata=_doc(
            "Memory all image decodes may hold at once (each image: its pixels in the file's "
            "mode plus the RGB image, read from its header); an image waits for its share up "
            "to decode_timeout_s, then RESOURCE_EXHAUSTED; one over the whole budget: "
            "INVALID_ARGUMENT."
        ),
    )
    decode_timeout_s: float = field(
        default=5.0,
        metadata=_doc(
            "Longest decode of one image: with decode_isolation process its worker is killed "
            "and the request gets DEADLINE_EXCEEDED (threads cannot be stopped). Also the "
            "longest wait for decode memory."
        ),
    )
    decode_isolation: str = field(
        default="thread",
        metadata=_doc(
            "Where images are decoded: thread (the server's decode threads) or process "
            "(one worker process per decode thread, killed and replaced at decode_timeout_s)."
        ),
    )
    rollout_max_accuracy_drop: float = field(
        default=0.05,
        metadata=_doc(
            "A new version must not lose more accuracy than this (0-1) on the golden set of "
            "the version it replaces, or it is refused and the old one keeps serving (1: off)."
        ),
    )
    allow_versions_without_golden_set: bool = field(
        default=False,
        metadata=_doc(
            "Serve a version whose golden set is missing or unreadable (and judge a rollout "
            "whose baseline's golden set is unreadable as passed), unchecked and with a "
            "warning; otherwise such a version is refused."
        ),
    )
    state_dir: Path | None = field(
        default=None,
        metadata=_doc(
            "This replica's own state: markers of versions being loaded (a version a server "
            "died loading is skipped at the next start) and rollout verdicts a read-only model "
            "repository cannot hold (default: <temp dir>/finetune-server-state-<uid>/<repository "
            "name>-<hash>; an emptyDir in Kubernetes)."
        ),
    )
    capture_dir: Path | None = field(
        default=None,
        metadata=_doc(
            "Capture uncertain Classify images (abstained, low margin, a random few) with a "
            "JSON sidecar under DIR/unlabeled/<label>/ for review (default: off). Captured "
            "images are user data: see README, 'Capture for review'."
        ),
    )
    capture_max_mb: int = field(
        default=1024, metadata=_doc("Size cap of the capture directory; oldest deleted first.")
    )
    capture_per_second: float = field(
        default=5.0, metadata=_doc("Most captures written per second; more are dropped.")
    )
    capture_margin: float = field(
        default=0.2,
        metadata=_doc("Capture when the top two probabilities are closer than this."),
    )
    capture_random_share: float = field(
        default=0.01, metadata=_doc("Share of other answers captured at random (0-1).")
    )
    log_level: str = field(default="INFO", metadata=_doc("Python logging level."))

    def __post_init__(self) -> None:
        _validate(self)


def _validate(config: ServerConfig) -> None:
    _validate_choices(config)
    _validate_ranges(config)
    _validate_limits(config)
    _validate_capture_and_rollout(config)
    _validate_tls(config)
    _validate_connections(config)


def _validate_connections(config: ServerConfig) -> None:
    if config.max_inflight_input_bytes < 1:
        raise ConfigError(
            f"max_inflight_input_bytes must be >= 1, got {config.max_inflight_input_bytes}"
        )
    if config.max_health_watches < 0:
        raise ConfigError(f"max_health_watches must be >= 0, got {config.max_health_watches}")
    longest = 2**31 // 1000  # grpc takes milliseconds as a C int
    times = (
        "keepalive_time_s",
        "keepalive_timeout_s",
        "health_watch_max_s",
        "max_connection_idle_s",
        "max_connection_age_s",
        "max_connection_age_grace_s",
    )
    for name in times:
        value = getattr(config, name)
        lowest = 0.001 if name.startswith("keepalive") else 0.0  # 0: never, for the others
        if not lowest <= value <= longest:
            raise ConfigError(f"{name} must be in {lowest:g}..{longest}, got {value}")


def _validate_choices(config: ServerConfig) -> None:
    if config.providers not in PROVIDER_CHOICES:
        raise ConfigError(f"providers must be one of {PROVIDER_CHOICES}, got {config.providers!r}")
    if config.graph_optimization not in GRAPH_OPTIMIZATION_CHOICES:
        raise ConfigError(
            f"graph_optimization must be one of {GRAPH_OPTIMIZATION_CHOICES}, "
            f"got {config.graph_optimization!r}"
        )
    if config.decode_isolation not in DECODE_ISOLATION_CHOICES:
        raise ConfigError(
            f"decode_isolation must be one of {DECODE_ISOLATION_CHOICES}, "
            f"got {config.decode_isolation!r}"
        )
    if config.ort_spinning not in SPINNING_CHOICES:
        raise ConfigError(
            f"ort_spinning must be one of {SPINNING_CHOICES}, got {config.ort_spinning!r}"
        )


def _validate_ports(config: ServerConfig) -> None:
    if not 0 <= config.grpc_port <= 65535:
        raise ConfigError(f"grpc_port must be in 0..65535, got {config.grpc_port}")
    for name in ("http_port", "metrics_port", "health_port"):  # -1: that listener is off
        value = getattr(config, name)
        if not -1 <= value <= 65535:
            raise ConfigError(f"{name} must be in -1..65535, got {value}")
    if config.metrics_timeout_s <= 0:
        raise ConfigError(f"metrics_timeout_s must be > 0, got {config.metrics_timeout_s}")


def _validate_ranges(config: ServerConfig) -> None:
    _validate_ports(config)
    positive = (
        "max_queue_size",
        "instances",
        "max_message_bytes",
        "max_image_bytes",
        "max_image_pixels",
        "max_decode_memory_mb",
    )
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("intra_op_threads", "inter_op_threads", "preprocess_workers"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0")
    if config.max_batch_size is not None and config.max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {config.max_batch_size}")
    if config.max_queue_delay_us is not None and config.max_queue_delay_us < 0:
        raise ConfigError("max_queue_delay_us must be >= 0")
    for name in ("poll_interval_s", "drain_delay_s", "grace_period_s", "warmup_timeout_s"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0")
    if any(size < 1 for size in config.warmup_batch_sizes):
        raise ConfigError("warmup_batch_sizes must be >= 1")


def _validate_limits(config: ServerConfig) -> None:
    counts = (
        "max_images_per_request",
        "max_pending_images",
        "max_concurrent_rpcs",
        "max_concurrent_streams",
        "max_queued_bytes",
    )
    for name in counts:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not config.decode_timeout_s > 0:
        raise ConfigError(f"decode_timeout_s must be > 0, got {config.decode_timeout_s}")
    if config.max_image_aspect < 1:
        raise ConfigError(f"max_image_aspect must be >= 1, got {config.max_image_aspect}")
    for name in ("stream_idle_timeout_s", "stream_max_duration_s", "load_retry_s"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0")


def _validate_capture_and_rollout(config: ServerConfig) -> None:
    if config.capture_max_mb < 1:
        raise ConfigError(f"capture_max_mb must be >= 1, got {config.capture_max_mb}")
    if not config.capture_per_second > 0:
        raise ConfigError(f"capture_per_second must be > 0, got {config.capture_per_second}")
    for name in ("capture_margin", "capture_random_share", "rollout_max_accuracy_drop"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {getattr(config, name)}")


def _validate_tls(config: ServerConfig) -> None:
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("tls_cert and tls_key must be given together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key")
    if config.tls_client_allowed_names and config.tls_client_ca is None:
        raise ConfigError("tls_client_allowed_names needs tls_client_ca (mTLS)")


FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}
# Errors name a flag's value by its field (``--grpc-port`` reads as ``grpc_port``), as the
# checks in ``_validate`` do; a file's by the file and the key.
LOADER = SettingsLoader(
    ServerConfig,
    env_prefix=ENV_PREFIX,
    ignored_environment=frozenset({f"{ENV_PREFIX}CONFIG"}),
    flag_source="{name}",
)


def _help(spec: dataclasses.Field[Any]) -> str:
    text = str(spec.metadata["help"])
    if "default" in text:  # the help says what the unset value means
        return text
    default = spec.default
    if default is None:
        shown = "unset"
    elif isinstance(default, tuple):
        shown = ",".join(map(str, default)) or "empty"
    else:
        shown = str(default)
    return f"{text} [default: {shown}]"


def build_parser() -> argparse.ArgumentParser:
    """The ``server`` command line; every flag defaults to 'not given' so precedence works."""
    parser = argparse.ArgumentParser(
        prog="server",
        description=(
            "gRPC inference server for ONNX image classifiers: the Open Inference Protocol v2 "
            "(Triton-compatible), a finetune.v1.Classifier service, grpc.health.v1 and "
            "reflection on one port, the same protocol and image classify over HTTP/REST on "
            "another, Prometheus metrics on a third. Every flag can also be set as "
            "SERVER_<FLAG> in the environment (e.g. SERVER_GRPC_PORT=9001) or in the "
            "--config YAML file (keys as the flag names). Precedence: defaults < file < "
            "environment < flags."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="YAML file of settings (env SERVER_CONFIG).")
    for name, spec in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": _help(spec)}
        if name == "providers":
            kwargs["choices"] = PROVIDER_CHOICES
        if name == "graph_optimization":
            kwargs["choices"] = GRAPH_OPTIMIZATION_CHOICES
        if name == "ort_spinning":
            kwargs["choices"] = SPINNING_CHOICES
        if name == "decode_isolation":
            kwargs["choices"] = DECODE_ISOLATION_CHOICES
        parser.add_argument(flag, dest=name, metavar=name.upper(), **kwargs)
    return parser


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Resolve the settings from flags, environment and an optional YAML file.

    Raises:
        ConfigError: the first problem, naming the setting and where it came from.
    """
    environ = os.environ if environ is None else environ
    flags = vars(build_parser().parse_args(argv))
    config_path = flags.pop("config", None) or environ.get(f"{ENV_PREFIX}CONFIG")
    try:
        given = LOADER.read(
            file=Path(config_path) if config_path else None, environ=environ, flags=flags
        )
    except SettingError as error:
        raise ConfigError(str(error)) from None
    try:
        return ServerConfig(**{name: setting.value for name, setting in given.items()})
    except ConfigError as error:
        # The checks name the field first ("grpc_port must be ..."); the user may have set it
        # as SERVER_GRPC_PORT or in a file, so say where the value came from.
        field_name = str(error).split(" ", 1)[0]
        if field_name not in given or given[field_name].source == field_name:
            raise
        raise ConfigError(f"{given[field_name].source}: {error}") from None


def config_as_dict(config: ServerConfig) -> dict[str, Any]:
    """The resolved settings as plain JSON-able values (for logs)."""
    result = {}
    for name in FIELDS:
        value = getattr(config, name)
        result[name] = str(value) if isinstance(value, Path) else value
    return result
