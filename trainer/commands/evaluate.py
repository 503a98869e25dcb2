"""``trainer evaluate``: how a trained model does on any image folder of its classes.

The folder is ``DIR/<class>/*``, the layout of one split of the trainer's data (``DATA/val``, or
a test folder kept out of training); its class folders must be the model's classes, no more and
no fewer. Files the trainer would skip (unreadable, over the pixel budget, of another format)
are skipped and counted here too. Two engines:

- ``pytorch`` (``--checkpoint``): the checkpoint read by the trainer's one safe loader, its
  images through the trainer's eval path (``trainer.data.image_decode``, torchvision's resize and
  centre crop), the serving module around the classifier, so the probabilities are
  ``softmax(logits / T)`` with the checkpoint's calibration temperature, as exported.
- ``onnxruntime`` (``--model-repository``): one version of a Triton-layout repository on the
  CPU, its images decoded and resized with Pillow as the server does
  (``trainer.export.images.preprocess``) and fed in the graph's input format from its
  ``model.json``; the probabilities are the graph's own output.

Both report the same measures: top-1 and (with more than five classes) top-5 accuracy,
precision, recall, F1 and support per class, the confusion matrix, the expected calibration
error (15 bins) of the probabilities and their negative log-likelihood.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contracts.atomic_files import atomic_write_bytes
from contracts.graph_signature import INPUT_NAME, OUTPUT_NAMES, UINT8_NHWC
from contracts.model_metadata import InvalidModelMetadata, ModelMetadata, read_model_metadata
from contracts.preprocessing import Preprocessing
from contracts.repository_layout import (
    METADATA_FILENAME,
    MODEL_FILENAME,
    InvalidModelName,
    validate_model_name,
    version_numbers,
)
from trainer.checkpoint import load_checkpoint
from trainer.data.augment import eval_transform
from trainer.data.folders import Sample, report_corrupt, scan_class_folders
from trainer.data.image_decode import CorruptImage, decode_image
from trainer.errors import CheckpointError, ConfigError, DataError, UsageError
from trainer.evaluation.calibration import (
    ECE_BINS,
    expected_calibration_error,
    negative_log_likelihood,
)
from trainer.evaluation.report import per_class_scores, write_confusion_figure
from trainer.export.graph import ServingModel
from trainer.export.images import preprocess
from trainer.export.ort_checks import cpu_session, to_feed
from trainer.model.classifier import restore_classifier

log = logging.getLogger(__name__)

EVALUATION_FILENAME = "evaluation.json"
CONFUSION_FILENAME = "confusion.png"
DEFAULT_BATCH_SIZE = 32
DEFAULT_MODEL_NAME = "classifier"
TOP_K = 5
#: Larger confusion matrices are not printed (too wide for a terminal); the files have them.
MAX_PRINTED_CLASSES = 20
_NAME_WIDTH = 12

# [N, H, W, 3] uint8 -> (logits, probabilities), each [N, C].
Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ModelUnderTest:
    """A loaded model, whichever engine runs it.

    Attributes:
        engine: ``pytorch`` or ``onnxruntime``.
        source: what was loaded (path, repository, name, version, ...), for the report.
        classes: class names in output order.
        temperature: the calibration temperature its probabilities use (1.0: none).
        load_image: one file -> ``[H, W, 3]`` uint8, as this engine's input path prepares it;
            raises ``CorruptImage`` for a file the trainer would skip.
        score: a batch of those images -> logits and probabilities.
    """

    engine: str
    source: dict[str, Any]
    classes: tuple[str, ...]
    temperature: float
    load_image: Callable[[Path], np.ndarray]
    score: Scorer


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_folder`` measured (``to_dict`` is ``evaluation.json``)."""

    engine: str
    source: dict[str, Any]
    data: Path
    classes: tuple[str, ...]
    skipped: tuple[str, ...]
    top1: float
    top5: float | None
    ece: float
    nll: float
    temperature: float
    scores: dict[str, Any]
    confusion: np.ndarray

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    def to_dict(self) -> dict[str, Any]:
        """The documented keys of ``evaluation.json`` (docs/trainer.md)."""
        return {
            "engine": self.engine,
            "model": self.source,
            "data": str(self.data),
            "classes": list(self.classes),
            "images": self.images,
            "skipped": len(self.skipped),
            "skipped_files": list(self.skipped),
            "top1_accuracy": self.top1,
            "top5_accuracy": self.top5,
            "ece": self.ece,
            "ece_bins": ECE_BINS,
            "nll": self.nll,
            "temperature": self.temperature,
            "macro_avg": self.scores["macro_avg"],
            "weighted_avg": self.scores["weighted_avg"],
            "per_class": self.scores["per_class"],
            "confusion": self.confusion.tolist(),
        }


# ---- the two engines ------------------------------------------------------------------------


def load_checkpoint_model(path: Path) -> ModelUnderTest:
    """A trainer checkpoint in PyTorch (CPU) behind the trainer's eval preprocessing.

    Raises:
        CheckpointError: missing, unreadable, unsafe or malformed checkpoint, or weights that
            do not fit its architecture.
    """
    try:
        checkpoint = load_checkpoint(Path(path))
    except CheckpointError as error:
        if "\n" not in str(error):
            raise
        # torch's text for a file it cannot unpickle runs to a page, and suggests loading
        # without weights_only: the one line the command line prints says what matters.
        raise CheckpointError(
            f"checkpoint {path} cannot be read: torch.load(weights_only=True) refused it "
            "(not a checkpoint written by trainer train, or a damaged one)"
        ) from error
    try:
        classifier, weights = restore_classifier(checkpoint)
    except CheckpointError as error:  # load_state_dict lists every key, one a line
        raise CheckpointError(_one_line(str(error))) from error
    pre = checkpoint.header.preprocessing
    temperature = checkpoint.temperature
    serving = ServingModel(
        classifier, input_format=UINT8_NHWC, mean=pre.mean, std=pre.std, temperature=temperature
    ).eval()
    transform = eval_transform(pre)

    def load_image(file: Path) -> np.ndarray:
        crop = transform(decode_image(file))
        return crop.permute(1, 2, 0).numpy()

    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, probabilities = serving(torch.from_numpy(images))
        return logits.numpy(), probabilities.numpy()

    source = {"checkpoint": str(path), "arch": checkpoint.header.arch, "weights": weights}
    return ModelUnderTest(
        "pytorch", source, checkpoint.header.classes, temperature, load_image, score
    )


def _one_line(message: str, limit: int = 400) -> str:
    """A message for the one ``trainer: error:`` line: whitespace collapsed, long ones cut."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_repository_model(
    repository: Path, name: str = DEFAULT_MODEL_NAME, version: int | None = None
) -> ModelUnderTest:
    """One version of a model repository in onnxruntime (CPU), fed as the server feeds it.

    Args:
        repository: the repository root (``REPO/<name>/<version>/model.onnx``).
        name: the model's directory.
        version: the version to load; None: the latest complete one.

    Raises:
        UsageError: no such model or version, or a ``model.json`` that does not describe the
            graph's input (naming the file and the key).
    """
    try:
        validate_model_name(name)
    except InvalidModelName as error:
        raise ConfigError(f"--model: {error}") from None
    model_root = Path(repository) / name
    if not model_root.is_dir():
        raise UsageError(f"model repository {repository} has no model {name!r} ({model_root})")
    complete = [
        v for v in version_numbers(model_root) if (model_root / str(v) / MODEL_FILENAME).is_file()
    ]
    if version is None:
        if not complete:
            raise UsageError(f"{model_root} has no complete version (none with {MODEL_FILENAME})")
        version = complete[-1]
    elif version not in complete:
        raise UsageError(
            f"{model_root} has no version {version} with {MODEL_FILENAME} "
            f"(complete versions: {complete or 'none'})"
        )
    directory = model_root / str(version)
    metadata, pre = _read_model_json(directory / METADATA_FILENAME)
    input_format = metadata.input_format
    try:
        session = cpu_session(directory / MODEL_FILENAME)
    except Exception as error:  # onnxruntime raises its own types for a file it cannot load
        raise UsageError(
            _one_line(
                f"{directory / MODEL_FILENAME}: onnxruntime cannot load it "
                f"({type(error).__name__}: {error})"
            )
        ) from None

    def load_image(file: Path) -> np.ndarray:
        try:
            return preprocess(file, input_size=pre.input_size, resize_size=pre.resize_size)
        except DataError as error:  # how the export's loader reports an undecodable file
            raise CorruptImage(str(error.__cause__ or error)) from error

    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feed = to_feed(images, input_format, pre.mean, pre.std)
        logits, probabilities = session.run(list(OUTPUT_NAMES), {INPUT_NAME: feed})
        return np.asarray(logits, np.float32), np.asarray(probabilities, np.float32)

    source = {
        "repository": str(repository),
        "name": name,
        "version": version,
        "precision": metadata.precision,
        "input_format": input_format,
    }
    return ModelUnderTest(
        "onnxruntime", source, metadata.labels, metadata.temperature, load_image, score
    )


def _read_model_json(path: Path) -> tuple[ModelMetadata, Preprocessing]:
    """An exported version's metadata, with the labels and preprocessing evaluation needs."""
    try:
        metadata = read_model_metadata(path)
    except InvalidModelMetadata as error:
        raise UsageError(f"cannot read the export metadata: {error}") from None
    if not metadata.labels:
        raise UsageError(f"{path}: labels must be a non-empty list of class names")
    if metadata.preprocessing is None:
        raise UsageError(f"{path}: input_size is missing (the graph's preprocessing)")
    return metadata, metadata.preprocessing


# ---- the folder, the pass, the measures -----------------------------------------------------


def list_images(data_dir: Path, classes: Sequence[str]) -> tuple[list[Sample], list[str]]:
    """The image files of ``data_dir/<class>/`` labelled with the model's class indices, and the
    files of other formats (skipped, as training skips them).

    Raises:
        DataError: a missing folder, class folders that are not the model's classes (naming
            the missing and the extra ones), or a class folder without images.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data: {data_dir} does not exist or is not a directory")
    folders = sorted(
        p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    missing = [name for name in classes if name not in folders]
    extra = [name for name in folders if name not in classes]
    if missing or extra:
        hint = ""
        if {"train", "val"} & set(extra):
            hint = f"; point --data at one split, e.g. {data_dir / 'val'}"
        raise DataError(
            f"data: the class folders of {data_dir} are not the model's {len(classes)} classes "
            f"(missing: {missing or 'none'}; not classes of the model: {extra or 'none'}){hint}"
        )
    unsupported: list[str] = []
    folder_classes, found = scan_class_folders(data_dir, unsupported)
    index = {name: i for i, name in enumerate(classes)}
    samples = [Sample(s.path, index[folder_classes[s.label]]) for s in found]
    return samples, [f"{path}: not a supported image format" for path in unsupported]


@dataclass(frozen=True)
class _Outputs:
    logits: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray
    skipped: list[str]


def _run_model(model: ModelUnderTest, samples: Sequence[Sample], batch_size: int) -> _Outputs:
    """Every readable image through the model, ``batch_size`` at a time."""
    logits: list[np.ndarray] = []
    probabilities: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[str] = []
    for start in range(0, len(samples), batch_size):
        images = []
        for sample in samples[start : start + batch_size]:
            try:
                images.append(model.load_image(sample.path))
            except CorruptImage as error:
                skipped.append(str(error))
                continue
            labels.append(sample.label)
        if images:
            batch_logits, batch_probabilities = model.score(np.stack(images))
            logits.append(batch_logits)
            probabilities.append(batch_probabilities)
    if not labels:
        return _Outputs(np.empty((0, 0)), np.empty((0, 0)), np.empty(0, np.int64), skipped)
    return _Outputs(
        np.concatenate(logits).astype(np.float64),
        np.concatenate(probabilities).astype(np.float64),
        np.asarray(labels, dtype=np.int64),
        skipped,
    )


def evaluate_folder(
    model: ModelUnderTest, data_dir: Path, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Evaluation:
    """Run ``model`` on every image of ``data_dir`` and measure it.

    Raises:
        DataError: see ``list_images``; or no image could be read.
    """
    samples, unsupported = list_images(Path(data_dir), model.classes)
    outputs = _run_model(model, samples, batch_size)
    skipped = [*unsupported, *outputs.skipped]
    report_corrupt(skipped, strict=False)
    if not len(outputs.labels):
        raise DataError(f"data: none of the {len(samples)} image(s) in {data_dir} could be read")
    count = len(model.classes)
    predicted = outputs.logits.argmax(axis=1)
    top5 = None
    if count > TOP_K:
        best = np.argsort(-outputs.logits, axis=1)[:, :TOP_K]
        top5 = float((best == outputs.labels[:, None]).any(axis=1).mean())
    confusion = np.zeros((count, count), dtype=np.int64)
    np.add.at(confusion, (outputs.labels, predicted), 1)
    labels = torch.from_numpy(outputs.labels)
    return Evaluation(
        engine=model.engine,
        source=model.source,
        data=Path(data_dir),
        classes=model.classes,
        skipped=tuple(skipped),
        top1=float((predicted == outputs.labels).mean()),
        top5=top5,
        ece=expected_calibration_error(torch.from_numpy(outputs.probabilities), labels),
        nll=negative_log_likelihood(torch.from_numpy(outputs.logits), labels, model.temperature),
        temperature=model.temperature,
        scores=per_class_scores(confusion, model.classes),
        confusion=confusion,
    )


# ---- what the user sees ---------------------------------------------------------------------


def format_report(evaluation: Evaluation) -> str:
    """The measures as plain-text tables for the terminal."""
    e = evaluation
    what = ", ".join(f"{key} {value}" for key, value in e.source.items() if value is not None)
    correct = int(np.trace(e.confusion))
    top5 = f"{e.top5:.4f}" if e.top5 is not None else f"n/a ({len(e.classes)} classes)"
    lines = [
        f"{'engine':<20}{e.engine}",
        f"{'model':<20}{what}",
        f"{'data':<20}{e.data}",
        f"{'images':<20}{e.images} of {len(e.classes)} classes, {len(e.skipped)} file(s) skipped",
        "",
        f"{'top-1 accuracy':<20}{e.top1:.4f}  ({correct} of {e.images})",
        f"{'top-5 accuracy':<20}{top5}",
        f"{f'ECE ({ECE_BINS} bins)':<20}{e.ece:.4f}",
        f"{'NLL':<20}{e.nll:.4f}",
        f"{'temperature':<20}{e.temperature:.4g}",
        "",
        *_class_table(e),
        "",
        *_confusion_table(e),
    ]
    return "\n".join(lines)


def _short(name: str, width: int = _NAME_WIDTH) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def _class_table(e: Evaluation) -> list[str]:
    width = max(_NAME_WIDTH, *(len(name) for name in e.classes))
    rows = [f"{'class':<{width}}  precision  recall      f1  support"]
    for name in e.classes:
        s = e.scores["per_class"][name]
        rows.append(
            f"{name:<{width}}  {s['precision']:9.3f}  {s['recall']:6.3f}  {s['f1']:6.3f}"
            f"  {s['support']:7d}"
        )
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        s = e.scores[key]
        rows.append(
            f"{label:<{width}}  {s['precision']:9.3f}  {s['recall']:6.3f}  {s['f1']:6.3f}"
            f"  {e.images:7d}"
        )
    return rows


def _confusion_table(e: Evaluation) -> list[str]:
    if len(e.classes) > MAX_PRINTED_CLASSES:
        return [
            f"confusion matrix: {len(e.classes)} classes, too wide to print "
            f"(--output writes {CONFUSION_FILENAME} and {EVALUATION_FILENAME})"
        ]
    names = [_short(name) for name in e.classes]
    width = max(5, *(len(name) for name in names))
    header = " " * (width + 2) + " ".join(f"{name:>{width}}" for name in names)
    rows = ["confusion matrix (rows: true class, columns: predicted class)", header]
    for name, row in zip(names, e.confusion, strict=True):
        rows.append(f"{name:<{width}}  " + " ".join(f"{int(n):>{width}}" for n in row))
    return rows


def write_outputs(evaluation: Evaluation, output_dir: Path) -> list[Path]:
    """Write ``evaluation.json`` and ``confusion.png`` into ``output_dir`` (atomically)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    document = json.dumps(evaluation.to_dict(), indent=2, allow_nan=False).encode() + b"\n"
    json_path = output_dir / EVALUATION_FILENAME
    atomic_write_bytes(json_path, document)
    figure_path = output_dir / CONFUSION_FILENAME
    write_confusion_figure(
        figure_path,
        evaluation.confusion,
        evaluation.classes,
        subject=f"{evaluation.data.name}, {evaluation.engine}",
    )
    return [json_path, figure_path]
