"""``model.json``: what an exported model version says about itself.

    REPO/<name>/<version>/model.json   this document; the same keys, each value JSON-encoded,
                                       are the ONNX file's ``metadata_props``

The export builds a ``ModelMetadata`` and writes it (``trainer.export.metadata``); the server
takes a version's labels, preprocessing, input format, abstention threshold and drift
reference from it; ``trainer evaluate`` feeds an exported graph by it and reports its
temperature. All of them read it with ``read_model_metadata`` (or ``metadata_from_props`` for a
version without the file), so one rule says what a valid document is and what a missing key
means. docs/architecture.md lists the keys.

Documents written before a key existed keep loading: every key may be missing and reads as
its default (no ``format_version``: 1; no ``labels``: none stated, the server takes
``labels.txt``'s; no ``input_format``: ``uint8-nhwc``; no ``input_size``: no preprocessing,
so the server serves raw tensors only and ``trainer evaluate`` refuses the version; no
``calibration``: temperature 1; no ``abstention``: never abstain; no ``val_class_counts``: no
drift reference). Keys this reader does not know are kept (``other``) and written back, so
what a newer exporter adds survives.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from contracts.graph_signature import DEFAULT_INPUT_FORMAT, INPUT_FORMATS
from contracts.json_files import UnreadableJson, read_json_object
from contracts.preprocessing import InvalidPreprocessing, Preprocessing

#: The document's shape. A reader refuses a newer one rather than misread it; documents
#: without the key are version 1.
METADATA_FORMAT_VERSION = 1
#: The largest ``model.json`` read: labels and counts of tens of thousands of classes fit.
MAX_METADATA_BYTES = 16 * 2**20
#: Slack for a threshold computed just above a top probability of 1.0.
_THRESHOLD_SLACK = 1e-6
_PREPROCESSING_KEYS = ("input_size", "resize_size", "mean", "std")


class InvalidModelMetadata(ValueError):  # noqa: N818 (names of the domain)
    """A ``model.json`` (or its ``metadata_props``) that cannot be read; the message names the
    key and the problem."""


@dataclass(frozen=True)
class TemperatureCalibration:
    """The softmax temperature fitted on val after training, and what it did there.

    The export divides the logits by ``temperature`` inside the graph, so its
    ``probabilities`` are calibrated. The checkpoint carries this record
    (``Checkpoint.calibration``) and the export copies it into ``model.json`` as it is.

    Attributes:
        ece_before, ece_after: expected calibration error (``ece_bins`` bins) on val.
        nll_before, nll_after: negative log-likelihood on val.
        count: the val images it was fitted on.
        other: keys this reader does not know, kept as they are.
    """

    temperature: float = 1.0
    ece_before: float | None = None
    ece_after: float | None = None
    nll_before: float | None = None
    nll_after: float | None = None
    count: int | None = None
    ece_bins: int | None = None
    other: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise InvalidModelMetadata(f"calibration.temperature {t!r} is not a positive number")
        _check_other(self.other, _keys(TemperatureCalibration), "calibration")

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"temperature": self.temperature}
        for key in ("ece_before", "ece_after", "nll_before", "nll_after", "count", "ece_bins"):
            if getattr(self, key) is not None:
                document[key] = getattr(self, key)
        return {**document, **self.other}

    @classmethod
    def from_dict(cls, document: Any) -> TemperatureCalibration:
        """Read what ``to_dict`` writes; a missing temperature is 1 (no scaling).

        Raises:
            InvalidModelMetadata: naming the key (``calibration.<key>``) and the problem.
        """
        entry = _object(document, "calibration")
        return cls(
            temperature=_number(entry, "temperature", "calibration.", default=1.0),
            ece_before=_number(entry, "ece_before", "calibration."),
            ece_after=_number(entry, "ece_after", "calibration."),
            nll_before=_number(entry, "nll_before", "calibration."),
            nll_after=_number(entry, "nll_after", "calibration."),
            count=_count(entry, "count", "calibration."),
            ece_bins=_count(entry, "ece_bins", "calibration."),
            other=_unknown(entry, _keys(cls)),
        )


@dataclass(frozen=True)
class Abstention:
    """Classify answers when an image's top probability is at least ``threshold`` and
    abstains below it.

    The export chooses it on val's (calibrated) probabilities for ``target_precision``; the
    answered val images were right ``precision`` of the time, ``coverage`` of ``count``.
    """

    threshold: float
    target_precision: float | None = None
    precision: float | None = None
    coverage: float | None = None
    count: int | None = None
    other: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 + _THRESHOLD_SLACK:
            raise InvalidModelMetadata(f"abstention.threshold {self.threshold} is not in [0, 1]")
        _check_other(self.other, _keys(Abstention), "abstention")

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"threshold": self.threshold}
        for key in ("target_precision", "precision", "coverage", "count"):
            if getattr(self, key) is not None:
                document[key] = getattr(self, key)
        return {**document, **self.other}

    @classmethod
    def from_dict(cls, document: Any) -> Abstention:
        """Read what ``to_dict`` writes.

        Raises:
            InvalidModelMetadata: naming the key (``abstention.<key>``) and the problem.
        """
        entry = _object(document, "abstention")
        threshold = entry.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise InvalidModelMetadata(f"abstention.threshold {threshold!r} must be a number")
        return cls(
            threshold=float(threshold),
            target_precision=_number(entry, "target_precision", "abstention."),
            precision=_number(entry, "precision", "abstention."),
            coverage=_number(entry, "coverage", "abstention."),
            count=_count(entry, "count", "abstention."),
            other=_unknown(entry, _keys(cls)),
        )


@dataclass(frozen=True)
class ModelMetadata:
    """One version's ``model.json``, typed (docs/architecture.md describes each key).

    What the server and ``trainer evaluate`` use is typed; the export's provenance records
    (``training``, ``dataset_fingerprint``, ``parity``, ``versions``, ``optimization``,
    ``adaptation``, ``int8``, ``precision_comparison``, ``parity_fp32``, ``golden_set``) are
    JSON objects as the step that measured them wrote them.

    Attributes:
        labels: class names in output order; empty when the document states none.
        preprocessing: resize, crop, mean and std (the keys ``input_size``, ``resize_size``,
            ``mean``, ``std`` at the top level); None when the document has no ``input_size``.
        input_format: how decoded pixels are laid out for the graph
            (``contracts.graph_signature``).
        calibration: the temperature baked into the graph's ``probabilities``.
        abstention: the threshold below which Classify abstains.
        val_class_counts: val images per class at export, the reference for class drift.
        other: keys this reader does not know, kept and written back.
    """

    labels: tuple[str, ...] = ()
    preprocessing: Preprocessing | None = None
    input_format: str = DEFAULT_INPUT_FORMAT
    precision: str | None = None
    arch: str | None = None
    weights: str | None = None
    training: Mapping[str, Any] | None = None
    dataset_fingerprint: Mapping[str, Any] | None = None
    parity: Mapping[str, Any] | None = None
    exporter: str | None = None
    versions: Mapping[str, Any] | None = None
    git_commit: str | None = None
    created_at: str | None = None
    state_source: str | None = None
    optimization: Mapping[str, Any] | None = None
    adaptation: Mapping[str, Any] | None = None
    calibration: TemperatureCalibration | None = None
    int8: Mapping[str, Any] | None = None
    precision_comparison: Mapping[str, Any] | None = None
    parity_fp32: Mapping[str, Any] | None = None
    val_class_counts: tuple[int, ...] | None = None
    abstention: Abstention | None = None
    golden_set: Mapping[str, Any] | None = None
    format_version: int = METADATA_FORMAT_VERSION
    other: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise InvalidModelMetadata(f"input_format {self.input_format!r} not in {INPUT_FORMATS}")
        counts = self.val_class_counts
        if counts is not None and (
            len(counts) != len(self.labels)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
        ):
            raise InvalidModelMetadata(
                f"val_class_counts must be {len(self.labels)} counts, one a label"
            )
        stated = _PREPROCESSING_KEYS if self.preprocessing is not None else ()
        _check_other(self.other, (*_TOP_LEVEL_KEYS, *stated), "model.json")

    @property
    def temperature(self) -> float:
        """The softmax temperature of the graph's ``probabilities`` (1.0: not calibrated)."""
        return 1.0 if self.calibration is None else self.calibration.temperature

    @property
    def abstention_threshold(self) -> float:
        """Classify abstains below this top probability (0.0: never)."""
        return 0.0 if self.abstention is None else self.abstention.threshold

    def to_dict(self) -> dict[str, Any]:
        """The document, keys in the export's order; optional records only when present."""
        document: dict[str, Any] = {
            "format_version": self.format_version,
            "labels": list(self.labels),
            "input_format": self.input_format,
        }
        if self.preprocessing is not None:
            document.update(self.preprocessing.to_dict())
        document.update(
            {
                "precision": self.precision,
                "arch": self.arch,
                "weights": self.weights,
                "training": _copy(self.training),
                "dataset_fingerprint": _copy(self.dataset_fingerprint),
                "parity": _copy(self.parity),
                "exporter": self.exporter,
                "versions": _copy(self.versions),
                "git_commit": self.git_commit,
                "created_at": self.created_at,
                "state_source": self.state_source,
                "optimization": _copy(self.optimization),
            }
        )
        optional = {
            "adaptation": _copy(self.adaptation),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "int8": _copy(self.int8),
            "precision_comparison": _copy(self.precision_comparison),
            "parity_fp32": _copy(self.parity_fp32),
            "val_class_counts": (
                None if self.val_class_counts is None else list(self.val_class_counts)
            ),
            "abstention": None if self.abstention is None else self.abstention.to_dict(),
            "golden_set": _copy(self.golden_set),
        }
        document.update({key: value for key, value in optional.items() if value is not None})
        return {**document, **self.other}

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> ModelMetadata:
        """Read and check a document (``to_dict``'s, or one written by an earlier release).

        Raises:
            InvalidModelMetadata: naming the key and the problem.
        """
        version = _count(document, "format_version", "", default=1)
        if version is None or version < 1 or version > METADATA_FORMAT_VERSION:
            raise InvalidModelMetadata(
                f"format_version {version!r} is not one this release reads "
                f"(1 to {METADATA_FORMAT_VERSION}): export it again, or read it with a newer "
                "release"
            )
        labels = document.get("labels") or []
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InvalidModelMetadata("labels must be a list of strings")
        input_format = document.get("input_format", DEFAULT_INPUT_FORMAT)
        if not isinstance(input_format, str):
            raise InvalidModelMetadata(f"input_format {input_format!r} not in {INPUT_FORMATS}")
        preprocessing = None
        known = set(_TOP_LEVEL_KEYS)
        if "input_size" in document:
            try:
                preprocessing = Preprocessing.from_dict(document)
            except InvalidPreprocessing as error:
                raise InvalidModelMetadata(str(error)) from None
            known.update(_PREPROCESSING_KEYS)
        calibration = document.get("calibration")
        abstention = document.get("abstention")
        counts = document.get("val_class_counts")
        if counts is not None and not isinstance(counts, list):
            raise InvalidModelMetadata(
                f"val_class_counts must be {len(labels)} counts, one a label"
            )
        return cls(
            labels=tuple(labels),
            preprocessing=preprocessing,
            input_format=input_format,
            precision=_string(document, "precision"),
            arch=_string(document, "arch"),
            weights=_string(document, "weights"),
            training=_record(document, "training"),
            dataset_fingerprint=_record(document, "dataset_fingerprint"),
            parity=_record(document, "parity"),
            exporter=_string(document, "exporter"),
            versions=_record(document, "versions"),
            git_commit=_string(document, "git_commit"),
            created_at=_string(document, "created_at"),
            state_source=_string(document, "state_source"),
            optimization=_record(document, "optimization"),
            adaptation=_record(document, "adaptation"),
            calibration=(
                None if calibration is None else TemperatureCalibration.from_dict(calibration)
            ),
            int8=_record(document, "int8"),
            precision_comparison=_record(document, "precision_comparison"),
            parity_fp32=_record(document, "parity_fp32"),
            val_class_counts=None if counts is None else tuple(counts),
            abstention=None if abstention is None else Abstention.from_dict(abstention),
            golden_set=_record(document, "golden_set"),
            format_version=version,
            other={key: value for key, value in document.items() if key not in known},
        )

    def to_json_bytes(self) -> bytes:
        """The file's bytes: indented JSON, no NaN or infinity (ValueError).

        Raises:
            ValueError: a value JSON cannot hold (NaN, infinity).
            TypeError: a value that is not plain JSON (a numpy scalar, say).
        """
        return (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode()

    def to_metadata_props(self) -> dict[str, str]:
        """The ONNX ``metadata_props``: one entry per key, its value JSON-encoded."""
        return {key: json.dumps(value, allow_nan=False) for key, value in self.to_dict().items()}


_TOP_LEVEL_KEYS = tuple(
    f.name for f in fields(ModelMetadata) if f.name not in ("preprocessing", "other")
)


def read_model_metadata(path: Path) -> ModelMetadata:
    """Read a version's ``model.json`` (at most ``MAX_METADATA_BYTES``) and check it.

    Raises:
        InvalidModelMetadata: unreadable, too large, not a JSON object, or a key malformed;
            the message names the file, the key and the problem.
    """
    try:
        return ModelMetadata.from_dict(read_json_object(path, max_bytes=MAX_METADATA_BYTES))
    except (UnreadableJson, InvalidModelMetadata) as error:
        raise InvalidModelMetadata(f"{path}: {error}") from None


def metadata_from_props(props: Mapping[str, str]) -> ModelMetadata | None:
    """The document from an ONNX file's ``metadata_props`` (a version without ``model.json``).

    Returns None when they hold neither ``labels`` nor ``input_size``: a graph the trainer did
    not export. A value that is not JSON is kept as its text (another tool's entry).

    Raises:
        InvalidModelMetadata: naming the key and the problem.
    """
    if "input_size" not in props and "labels" not in props:
        return None
    document: dict[str, Any] = {}
    for key, value in props.items():
        try:
            document[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            document[key] = value
    return ModelMetadata.from_dict(document)


# ---- checks that name the key ---------------------------------------------------------------


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name != "other")


def _check_other(other: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    clash = sorted(set(other) & set(known))
    if clash:
        raise InvalidModelMetadata(f"{where}: unknown keys {clash} are known ones")


def _unknown(entry: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key not in known}


def _object(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidModelMetadata(f"{name} must be a JSON object, found {value!r}")
    return value


def _record(document: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = document.get(key)
    return None if value is None else dict(_object(value, key))


def _string(document: Mapping[str, Any], key: str) -> str | None:
    value = document.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidModelMetadata(f"{key} must be a string, found {value!r}")
    return value


def _number(
    document: Mapping[str, Any], key: str, prefix: str, default: float | None = None
) -> Any:
    value = document.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidModelMetadata(f"{prefix}{key} must be a finite number, found {value!r}")
    return float(value)


def _count(
    document: Mapping[str, Any], key: str, prefix: str, default: int | None = None
) -> int | None:
    value = document.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidModelMetadata(f"{prefix}{key} must be a whole number >= 0, found {value!r}")
    return value


def _copy(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if record is None else dict(record)
