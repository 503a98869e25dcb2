"""The checkpoint: its one schema, its one safe loader, atomic saves, finding one to resume.

A checkpoint is the dict ``Checkpoint.to_dict`` writes (docs/architecture.md lists its keys):
a header shared by every checkpoint of a run (the model's identity, preprocessing and
provenance), the position, the progress, and the tensors. Everything that reads one (resume,
``--weights PATH``, export) goes through ``load_checkpoint`` and rebuilds the model from the
header, never from settings of its own.

A position ``(phase, epoch, step)`` says where training stands: ``step`` batches of 1-based
``epoch`` of ``phase`` are done (``step == -1``: the epoch is finished and evaluated).
``global_epoch`` counts finished epochs over all phases.

Loading never executes code: ``torch.load(weights_only=True)`` always, with only the types the
trainer itself writes allow-listed. A pickle that names any other global is refused.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
import random
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contracts.atomic_files import atomic_write_bytes
from contracts.model_metadata import InvalidModelMetadata, TemperatureCalibration
from contracts.preprocessing import InvalidPreprocessing, Preprocessing
from trainer.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "finetune-checkpoint"
FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
# The best model as phase 2 found it on entry (the head phase's), for the weight interpolation
# after the phases (``trainer.stages.interpolation``).
START_OF_PHASE_2 = "phase2-start.pt"
EPOCH_DONE = -1
PHASE_ORDER = {"head": 0, "finetune": 1}

# Types beyond tensors and plain containers that the trainer writes into a checkpoint. The
# trainer stores RNG states as tensors and lists, so none are needed today; a new entry here is
# a deliberate decision that the type is safe to construct from untrusted bytes.
SAFE_GLOBALS: tuple[Any, ...] = ()

_PREPROCESSING_KEYS = ("input_size", "resize_size", "mean", "std")
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeCheckpoint(CheckpointError):  # noqa: N818 - reads as what the file is
    """The file's pickle names a global outside the allow-list; nothing of it was executed."""


# ---- the schema ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSpec:
    """The classifier head ``create_model`` builds."""

    hidden: int | None = None
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "dropout": self.dropout}

    @classmethod
    def from_dict(cls, document: Mapping[str, Any] | None) -> HeadSpec:
        document = document or {}
        hidden = document.get("hidden")
        return cls(None if hidden is None else int(hidden), float(document.get("dropout") or 0.0))


@dataclass(frozen=True)
class CheckpointHeader:
    """What every checkpoint of one run shares: the model to rebuild and where it came from.

    ``config`` is the resolved training config (no unset defaults), as in ``config.yaml``.
    """

    arch: str
    classes: tuple[str, ...]
    head: HeadSpec
    preprocessing: Preprocessing
    weights: str
    dataset_fingerprint: dict[str, Any]
    config: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "head": self.head.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "weights": self.weights,
            "dataset_fingerprint": self.dataset_fingerprint,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], path: Path) -> CheckpointHeader:
        """Read and check the header keys of a checkpoint dict.

        Raises:
            CheckpointError: a key is missing or malformed (the message names it and ``path``).
        """
        missing = [
            key
            for key in ("arch", "num_classes", "classes", "head", "preprocessing")
            if key not in document
        ]
        if missing:
            raise CheckpointError(f"{path}: missing keys {missing}")
        classes = document["classes"]
        if not isinstance(classes, list | tuple) or len(classes) != document["num_classes"]:
            raise CheckpointError(
                f"{path}: 'classes' must list num_classes={document['num_classes']} names"
            )
        pre = document["preprocessing"] or {}
        missing = [key for key in _PREPROCESSING_KEYS if key not in pre]
        if missing:
            raise CheckpointError(f"{path}: preprocessing is missing {missing}")
        try:
            preprocessing = Preprocessing.from_dict(pre)
        except InvalidPreprocessing as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return cls(
            arch=str(document["arch"]),
            classes=tuple(str(c) for c in classes),
            head=HeadSpec.from_dict(document.get("head")),
            preprocessing=preprocessing,
            weights=str(document.get("weights")),
            dataset_fingerprint=dict(document.get("dataset_fingerprint") or {}),
            config=dict(document.get("config") or {}),
        )


@dataclass(frozen=True)
class Position:
    """Where a run stands; ordered so a later position compares greater."""

    phase_index: int
    epoch: int
    step: int

    @property
    def phase(self) -> str:
        return next(name for name, index in PHASE_ORDER.items() if index == self.phase_index)

    def key(self) -> tuple[int, int, float]:
        return (
            self.phase_index,
            self.epoch,
            float("inf") if self.step == EPOCH_DONE else self.step,
        )


@dataclass
class PhaseStats:
    """Throughput and time of one phase (kept across resumes in the checkpoint)."""

    epochs: int = 0
    images: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    early_stopped: bool = False
    # The phase's own best val accuracy: patience counts from it, not from an earlier
    # phase's, so a phase that first falls below the probe and then climbs is not cut short.
    best_val_accuracy: float = -1.0

    def summary(self) -> dict[str, Any]:
        ips = self.images / self.train_seconds if self.train_seconds else 0.0
        return {
            "epochs": self.epochs,
            "images_per_second": round(ips, 2),
            "wall_seconds": round(self.wall_seconds, 2),
            "early_stopped": self.early_stopped,
        }


@dataclass
class Progress:
    """What changes as the run goes: finished epochs, the best score, per-phase stats."""

    global_epoch: int = 0
    best_val_accuracy: float = -1.0
    # Epochs since the running phase last beat its own best (``PhaseStats.best_val_accuracy``).
    epochs_since_best: int = 0
    best_confusion: list[list[int]] | None = None
    stats: dict[str, PhaseStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "global_epoch": self.global_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            # Finished epochs per phase, also for phases that have not started.
            "epochs": {name: self.phase(name).epochs for name in PHASE_ORDER},
            "epochs_since_best": self.epochs_since_best,
            "best_confusion": self.best_confusion,
            "phase_stats": {k: dataclasses.asdict(v) for k, v in self.stats.items()},
        }

    def phase(self, name: str) -> PhaseStats:
        """The stats of phase ``name`` (zeros when it has not run)."""
        return self.stats.get(name, PhaseStats())

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Progress:
        stats = {
            name: PhaseStats(**values)
            for name, values in (document.get("phase_stats") or {}).items()
        }
        if not stats:
            # A checkpoint written without per-phase stats still says how far each phase got.
            stats = {
                name: PhaseStats(epochs=int(count))
                for name, count in (document.get("epochs") or {}).items()
                if count
            }
        return cls(
            global_epoch=int(document.get("global_epoch", 0)),
            best_val_accuracy=float(document.get("best_val_accuracy", -1.0)),
            epochs_since_best=int(document.get("epochs_since_best", 0)),
            best_confusion=document.get("best_confusion"),
            stats=stats,
        )


@dataclass(frozen=True)
class TrainingState:
    """The optimizer, scheduler, scaler and RNG states a resumed run continues from."""

    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file's content, typed."""

    header: CheckpointHeader
    position: Position
    progress: Progress
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None = None
    training: TrainingState = TrainingState()
    # The softmax temperature fitted on val after training (``trainer.stages.calibrate``); the
    # export divides the logits by it and copies the record into ``model.json``, whose
    # contract owns its type. Written into ``best.pt`` only.
    calibration: TemperatureCalibration | None = None
    # What adapted the model to unlabelled target images (``trainer.stages.adaptation``):
    # counts, methods, weights and the AdaBN decision, never the images. ``best.pt`` only;
    # the export copies it into ``model.json``.
    adaptation: dict[str, Any] | None = None
    # The diagonal Fisher information of the best model (``forgetting.FisherInformation``:
    # tensors by parameter name and counts), for EWC in a retrain from it. ``best.pt`` only.
    fisher: dict[str, Any] | None = None
    # The weight interpolation between the start and the end of phase 2
    # (``trainer.stages.interpolation``): the mixes tried, their val accuracies, the one kept.
    # ``best.pt`` only.
    interpolation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The dict ``torch.save`` writes (flat keys; docs/architecture.md)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            **self.header.to_dict(),
            "model_state": self.model_state,
            "ema_state": self.ema_state,
            "phase": self.position.phase,
            "epoch": self.position.epoch,
            "step": self.position.step,
            "optimizer_state": self.training.optimizer,
            "scheduler_state": self.training.scheduler,
            "scaler_state": self.training.scaler,
            "rng_state": self.training.rng,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "adaptation": self.adaptation,
            "fisher": self.fisher,
            "interpolation": self.interpolation,
            **self.progress.to_dict(),
        }

    @classmethod
    def from_dict(cls, document: Any, path: Path) -> Checkpoint:
        """Check the format and schema of a loaded dict.

        Raises:
            CheckpointError: not a dict of this format and version, or a key is missing or
                malformed (the message names ``path`` and the key).
        """
        if not isinstance(document, Mapping):
            raise CheckpointError(f"{path} holds a {type(document).__name__}, not a checkpoint")
        if document.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path}: format is {document.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
            )
        if document.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format_version {document.get('format_version')!r} is not supported "
                f"(this trainer reads version {FORMAT_VERSION})"
            )
        header = CheckpointHeader.from_dict(document, path)
        missing = [k for k in ("model_state", "phase", "epoch", "step") if k not in document]
        if missing:
            raise CheckpointError(f"{path}: missing keys {missing}")
        if document["phase"] not in PHASE_ORDER:
            raise CheckpointError(f"{path}: unknown phase {document['phase']!r}")
        calibration = document.get("calibration")
        try:
            if calibration is not None:
                calibration = TemperatureCalibration.from_dict(calibration)
        except InvalidModelMetadata as error:
            raise CheckpointError(f"{path}: {error}") from None
        return cls(
            header=header,
            position=Position(
                PHASE_ORDER[document["phase"]], int(document["epoch"]), int(document["step"])
            ),
            progress=Progress.from_dict(document),
            model_state=document["model_state"],
            ema_state=document.get("ema_state"),
            training=TrainingState(
                optimizer=document.get("optimizer_state"),
                scheduler=document.get("scheduler_state"),
                scaler=document.get("scaler_state"),
                rng=document.get("rng_state"),
            ),
            calibration=calibration,
            # Absent from checkpoints written before they existed.
            adaptation=document.get("adaptation"),
            fisher=document.get("fisher"),
            interpolation=document.get("interpolation"),
        )

    @property
    def temperature(self) -> float:
        """The softmax temperature the export bakes into ``probabilities`` (1.0: none fitted)."""
        return 1.0 if self.calibration is None else self.calibration.temperature

    @property
    def best_state(self) -> tuple[dict[str, torch.Tensor], str]:
        """The weights the run evaluated as its model: EMA when kept, else the raw weights."""
        if self.ema_state is not None:
            return self.ema_state, "ema_state"
        return self.model_state, "model_state"


# ---- reading and writing ------------------------------------------------------------------


def read_torch_file(path: Path) -> Any:
    """``torch.load`` that never executes code: tensors, containers and ``SAFE_GLOBALS`` only.

    The one place the trainer unpickles a file (checkpoints, state dicts from ``--weights``).

    Raises:
        CheckpointError: missing, unreadable or truncated file.
        UnsafeCheckpoint: the pickle names a global outside the allow-list (named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            # A newer pickle protocol than torch.save's own loads fine or fails below; the
            # warning would be a second stderr line beside the one-line error.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused is not None:
            raise UnsafeCheckpoint(
                f"refusing to load {path}: its pickle calls {refused.group(1)}, which is not "
                "a type the trainer writes (the file was not made by this trainer, or was "
                "tampered with); nothing from it was run"
            ) from None
        # torch's message is a page of advice to load with weights_only=False: not ours.
        raise CheckpointError(
            f"checkpoint {path} cannot be read: not a file torch.save wrote, or a damaged one"
        ) from exc
    except Exception as exc:
        first_line = str(exc).strip().split("\n", 1)[0]
        raise CheckpointError(
            f"checkpoint {path} cannot be read: not a file torch.save wrote, or a damaged one "
            f"({type(exc).__name__}: {first_line})"
        ) from exc


def is_checkpoint_dict(document: Any) -> bool:
    """Whether a loaded object claims to be a checkpoint of this trainer."""
    return isinstance(document, Mapping) and document.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and check a checkpoint written by ``trainer train``: resume, weights and export.

    Raises:
        CheckpointError: missing, unreadable, unsafe, or not of this format (a ``UsageError``).
    """
    return Checkpoint.from_dict(read_torch_file(path), Path(path))


def serialize(checkpoint: Checkpoint) -> bytes:
    """The bytes ``torch.save`` writes, so one serialisation can go to several files."""
    buffer = io.BytesIO()
    torch.save(checkpoint.to_dict(), buffer)
    return buffer.getvalue()


def save(directory: Path, data: bytes, *, best: bool) -> None:
    """Write ``last.pt`` (and ``best.pt`` when ``best``) atomically."""
    atomic_write_bytes(directory / LAST, data)
    if best:
        atomic_write_bytes(directory / BEST, data)


def find_resumable(directory: Path) -> tuple[Path, Checkpoint] | None:
    """The valid checkpoint furthest along in ``directory``, with its path.

    Truncated or malformed ones are logged and skipped (a kill during a write, an old format);
    an unsafe one is an error, never skipped silently.
    """
    found: list[tuple[Path, Checkpoint]] = []
    for name in (LAST, BEST):
        path = directory / name
        if not path.exists():
            continue
        try:
            found.append((path, load_checkpoint(path)))
        except UnsafeCheckpoint:
            raise
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    if not found:
        return None
    return max(found, key=lambda item: item[1].position.key())


# ---- random number generators -------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from (dropout, MixUp, sampler seeds), as plain values."""
    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": list(_tuple_to_list(random.getstate())),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the RNG states saved by ``rng_state``."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    random.setstate(_list_to_tuple(state["python"]))


def _tuple_to_list(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_tuple_to_list(v) for v in value]
    return value


def _list_to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_list_to_tuple(v) for v in value)
    return value
