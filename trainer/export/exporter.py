"""export_checkpoint: checkpoint -> verified ONNX -> published model version."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from torch import nn

from contracts.graph_signature import INPUT_FORMATS, UINT8_NHWC
from contracts.holdout_set import HOLDOUT_DIRNAME
from contracts.model_metadata import ModelMetadata
from contracts.preprocessing import Preprocessing
from contracts.repository_layout import METADATA_FILENAME, MODEL_FILENAME
from trainer.checkpoint import Checkpoint, load_checkpoint
from trainer.config import TrainConfig
from trainer.errors import ConfigError, DataError
from trainer.evaluation.abstention import DEFAULT_TARGET_PRECISION, choose_threshold
from trainer.evaluation.chance import warn_if_near_chance
from trainer.export import metadata as meta
from trainer.export.errors import ExportError
from trainer.export.golden import build_golden_set
from trainer.export.graph import ServingModel
from trainer.export.holdout import build_holdout_set
from trainer.export.images import ImageSet, SplitRule, list_split, load_split
from trainer.export.onnx_export import export_onnx
from trainer.export.optimize import optimize_offline
from trainer.export.ort_checks import GraphInput, cpu_session, run_logits
from trainer.export.precisions import INT8_MODES, PRECISIONS
from trainer.export.quantize import (
    DEFAULT_INT8_ACCURACY_BUDGET,
    LATENCY_BATCH,
    check_accuracy_budget,
    compare_with_fp32,
    convert_fp16,
    quantize_int8,
)
from trainer.export.repository import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_US,
    publish,
    render_config,
    validate_model_name,
)
from trainer.export.step_log import export_step, quiet_third_party
from trainer.export.verify import (
    FP32_TOLERANCE,
    ParityReport,
    check_model,
    check_signature,
    onnx_parity,
    random_images,
    torch_parity,
)
from trainer.model.classifier import restore_classifier

log = logging.getLogger(__name__)

#: fp16 logits may differ from fp32's by this fraction of the largest |logit| (at least 1).
FP16_RELATIVE_TOLERANCE = 1e-2
#: Val images used for parity, the accuracy comparison and latency; calibration images.
VAL_LIMIT = 2000
CALIBRATION_LIMIT = 128


@dataclass(frozen=True)
class ExportResult:
    """A published model version.

    Attributes:
        version: the version number it was published as.
        model_dir: ``REPO/<model-name>/<version>``.
        max_abs_diff: largest absolute logit difference of the published model against its
            reference (PyTorch for fp32, the verified fp32 ONNX model for fp16 and int8).
        precision: ``fp32``, ``fp16`` or ``int8``.
        exporter: the torch exporter that produced the graph.
        metadata: the ``model.json`` document (``ModelMetadata.to_dict``).
    """

    version: int
    model_dir: Path
    max_abs_diff: float
    precision: str = "fp32"
    exporter: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.model_dir / MODEL_FILENAME


@dataclass(frozen=True)
class _Graph:
    """What every step needs to know about the graph: its input format, the preprocessing
    the model carries from its checkpoint, and its output width."""

    input_format: str
    preprocessing: Preprocessing
    num_classes: int

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessing.input_size

    @property
    def mean(self) -> list[float]:
        return list(self.preprocessing.mean)

    @property
    def std(self) -> list[float]:
        return list(self.preprocessing.std)

    @property
    def input(self) -> GraphInput:
        return GraphInput(self.input_format, self.mean, self.std)


def export_checkpoint(  # noqa: PLR0913  every export option is a keyword the CLI and the run pass through
    checkpoint_path: Path,
    repository: Path,
    *,
    model_name: str = "classifier",
    input_format: str = UINT8_NHWC,
    precision: str = "fp32",
    data_dir: Path | None = None,
    int8_mode: str = "static",
    int8_accuracy_budget: float = DEFAULT_INT8_ACCURACY_BUDGET,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
    abstention_precision: float = DEFAULT_TARGET_PRECISION,
) -> ExportResult:
    """Export a checkpoint to ONNX, verify it, and publish it as the next model version.

    Args:
        checkpoint_path: a ``finetune-checkpoint`` file; EMA weights are used when present.
        repository: the Triton-layout model repository root.
        model_name: the model's directory in the repository.
        input_format: ``uint8-nhwc`` (preprocessing in the graph) or ``float32-nchw``.
        precision: ``fp32``, ``fp16`` or ``int8``.
        data_dir: ImageFolder root with ``train/`` and ``val/``: real-image parity, int8
            calibration and the accuracy comparison. Without it parity uses random images
            only, and int8 cannot be exported.
        int8_mode: ``static`` (calibrated on train images) or ``dynamic``.
        int8_accuracy_budget: largest val-accuracy drop (points) an int8 model may have.
        max_batch_size: ``max_batch_size`` written into ``config.pbtxt``.
        max_queue_delay_us: the dynamic batcher's queue delay written into ``config.pbtxt``.

    Raises:
        UsageError: bad options, checkpoint or data (exit code 2).
        ExportError: the export or a verification failed; nothing was published.
    """
    options = _Options(
        model_name=model_name,
        input_format=input_format,
        precision=precision,
        data_dir=data_dir,
        int8_mode=int8_mode,
        int8_accuracy_budget=int8_accuracy_budget,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        abstention_precision=abstention_precision,
    )
    options.validate()
    started = time.perf_counter()
    with quiet_third_party():
        source = _load_source(Path(checkpoint_path), options)
        with tempfile.TemporaryDirectory(prefix="export-") as work_dir:
            built = _build_version(source, Path(work_dir), options)
            with export_step("publish", model_name=model_name) as facts:
                document = _metadata(source, built, options)
                version, model_dir = _publish(
                    built, document, Path(repository), source.graph, options
                )
                facts["version"] = version
    log.info(
        "published %s version %d (%s, max abs logit diff %.3g) in %.1f s",
        model_name,
        version,
        precision,
        built.parity.max_abs_diff_logits,
        time.perf_counter() - started,
    )
    return ExportResult(
        version=version,
        model_dir=model_dir,
        max_abs_diff=built.parity.max_abs_diff_logits,
        precision=precision,
        exporter=built.exporter,
        metadata=document.to_dict(),
    )


@dataclass(frozen=True)
class _Options:
    """The export's options, as ``export_checkpoint`` documents them."""

    model_name: str
    input_format: str
    precision: str
    data_dir: Path | None
    int8_mode: str
    int8_accuracy_budget: float
    max_batch_size: int
    max_queue_delay_us: int
    abstention_precision: float

    def validate(self) -> None:
        """Check the options together, before any work.

        Raises:
            ConfigError: an unknown word, a negative budget, int8 without data.
            DataError: the data directory does not exist.
        """
        validate_model_name(self.model_name)
        if self.input_format not in INPUT_FORMATS:
            raise ConfigError(
                f"input format {self.input_format!r} is unknown; choose from {INPUT_FORMATS}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is unknown; choose from {PRECISIONS}")
        if self.int8_mode not in INT8_MODES:
            raise ConfigError(f"int8 mode {self.int8_mode!r} is unknown; choose from {INT8_MODES}")
        if not self.int8_accuracy_budget >= 0:
            raise ConfigError(
                f"int8 accuracy budget must be >= 0 points, got {self.int8_accuracy_budget}"
            )
        if self.precision == "int8" and self.data_dir is None:
            raise ConfigError(
                "int8 precision needs --data: val images for the accuracy check "
                "(and train images to calibrate static quantization)"
            )
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise DataError(f"data directory {self.data_dir} does not exist")


@dataclass(frozen=True)
class _Source:
    """What the export starts from: the checkpoint, its model, and the images it checks on."""

    checkpoint: Checkpoint
    classifier: nn.Module
    state_source: str
    graph: _Graph
    val_files: list[tuple[Path, int]]
    val: ImageSet | None
    calibration: ImageSet | None


@dataclass(frozen=True)
class _Built:
    """The verified graph of a version, its parity, metadata facts, and the files of its golden
    and holdout sets."""

    path: Path
    parity: ParityReport
    exporter: str
    # ``model.json`` facts of the later steps, by their ``ModelMetadata`` field names.
    extra: dict[str, Any]
    set_files: dict[str, bytes]


def _load_source(checkpoint_path: Path, options: _Options) -> _Source:
    """Step ``load``: the checkpoint (no code run), its classifier, the val (and calibration)
    images."""
    with export_step("load") as facts:
        checkpoint = load_checkpoint(checkpoint_path)
        warn_if_near_chance(
            log,
            f"the checkpoint {checkpoint_path}",
            checkpoint.progress.best_val_accuracy,
            checkpoint.header.num_classes,
        )
        classifier, state_source = restore_classifier(checkpoint)
        graph = _Graph(
            input_format=options.input_format,
            preprocessing=checkpoint.header.preprocessing,
            num_classes=checkpoint.header.num_classes,
        )
        val_files = _run_split(options.data_dir, "val", checkpoint)
        val = _load(val_files, checkpoint, VAL_LIMIT)
        calibration = None
        if options.precision == "int8" and options.int8_mode == "static":
            train_files = _run_split(options.data_dir, "train", checkpoint)
            calibration = _load(train_files, checkpoint, CALIBRATION_LIMIT)
        facts.update(
            arch=checkpoint.header.arch,
            weights=state_source,
            val_images=0 if val is None else len(val),
        )
        if calibration is not None:
            facts["calibration_images"] = len(calibration)
    return _Source(checkpoint, classifier, state_source, graph, val_files, val, calibration)


def _build_version(source: _Source, work: Path, options: _Options) -> _Built:
    """Steps ``export``, ``check``, ``parity``, ``optimise``, ``quantise`` (fp16, int8),
    ``abstention`` and ``golden_set``: the graph to publish and its facts."""
    graph, checkpoint = source.graph, source.checkpoint
    fp32_path = work / "fp32.onnx"
    serving = ServingModel(
        source.classifier,
        input_format=graph.input_format,
        mean=graph.mean,
        std=graph.std,
        temperature=checkpoint.temperature,
    )
    with export_step("export", arch=checkpoint.header.arch) as facts:
        exporter = export_onnx(
            serving, fp32_path, input_format=graph.input_format, input_size=graph.input_size
        )
        facts["exporter"] = exporter
    with export_step("check"):
        _check(fp32_path, graph)
    with export_step("parity") as facts:
        parity_fp32 = _parity(fp32_path, source.classifier, graph, source.val)
        facts.update(_parity_facts(parity_fp32))
    with export_step("optimise") as facts:
        fp32_path, optimization = _optimize(fp32_path, work, source.classifier, graph, source.val)
        facts.update(optimization)
    extra: dict[str, Any] = {"state_source": source.state_source, "optimization": optimization}
    final_path, parity = fp32_path, parity_fp32
    if options.precision != "fp32":
        with export_step("quantise", precision=options.precision) as facts:
            final_path, parity, variant_extra = _reduced_precision(fp32_path, work, source, options)
            facts.update(_parity_facts(parity), **variant_extra["precision_comparison"])
        extra.update(variant_extra, parity_fp32=parity_fp32.as_metadata())
    with export_step("abstention") as facts:
        extra.update(_val_class_counts(source.val_files, checkpoint))
        extra.update(
            _abstention(final_path, graph, source.val, checkpoint, options.abstention_precision)
        )
        abstention = extra.get("abstention")
        facts.update(abstention.to_dict() if abstention is not None else {"threshold": None})
    with export_step("golden_set") as facts:
        golden_files = _golden_set(options.data_dir, source, serving, final_path, extra)
        facts.update(extra.get("golden_set") or {"images": 0})
    holdout_files: dict[str, bytes] = {}
    if options.data_dir is not None and (Path(options.data_dir) / HOLDOUT_DIRNAME).is_dir():
        with export_step("holdout_set") as facts:
            holdout_files, holdout = build_holdout_set(options.data_dir, checkpoint.header.classes)
            facts.update(holdout)
    return _Built(final_path, parity, exporter, extra, golden_files | holdout_files)


def _parity_facts(parity: ParityReport) -> dict[str, Any]:
    return {
        "reference": parity.reference,
        "max_abs_diff_logits": float(f"{parity.max_abs_diff_logits:.3g}"),
        "tolerance": parity.tolerance,
    }


def _metadata(source: _Source, built: _Built, options: _Options) -> ModelMetadata:
    """The version's ``model.json``: the checkpoint's facts and those of every step."""
    return meta.build_metadata(
        source.checkpoint,
        input_format=options.input_format,
        precision=options.precision,
        parity=built.parity.as_metadata(),
        exporter=built.exporter,
        extra=built.extra,
    )


def _publish(
    built: _Built, document: ModelMetadata, repository: Path, graph: _Graph, options: _Options
) -> tuple[int, Path]:
    """Embed the metadata and publish the version atomically; its number and directory."""
    model = onnx.load(str(built.path))
    meta.embed(model, document)
    try:
        model_bytes = model.SerializeToString()
    except ValueError as error:
        raise ExportError(f"the model does not fit one ONNX file (2 GB): {error}") from error
    config_text = render_config(
        options.model_name,
        input_format=graph.input_format,
        input_size=graph.input_size,
        num_classes=graph.num_classes,
        max_batch_size=options.max_batch_size,
        max_queue_delay_us=options.max_queue_delay_us,
    )
    return publish(
        repository,
        options.model_name,
        version_files={
            MODEL_FILENAME: model_bytes,
            METADATA_FILENAME: document.to_json_bytes(),
            **built.set_files,
        },
        config_text=config_text,
        labels=list(document.labels),
    )


def _abstention(
    model_path: Path,
    graph: _Graph,
    val: ImageSet | None,
    checkpoint: Checkpoint,
    target_precision: float,
) -> dict[str, Any]:
    """The abstention threshold, chosen on the val images' (calibrated) probabilities.

    The graph's ``probabilities`` are ``softmax(logits / T)``, so the threshold is chosen on
    exactly the numbers the server will compare it with. Without val images: no threshold.
    """
    if val is None or len(val) == 0:
        return {}
    logits = (
        run_logits(cpu_session(model_path), val.images, graph.input).astype(np.float64)
        / checkpoint.temperature
    )
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    policy = choose_threshold(probabilities, val.labels, target_precision)
    log.debug(  # the abstention step line says it
        "abstention threshold %.3f: answers %.0f%% of %d val images at %.1f%% precision "
        "(target %.0f%%)",
        policy.threshold,
        100 * policy.coverage,
        policy.count,
        100 * policy.precision,
        100 * target_precision,
    )
    return {"abstention": policy.record()}


def _val_class_counts(val_files: list[tuple[Path, int]], checkpoint: Checkpoint) -> dict[str, Any]:
    """The run's whole val split, images per class: the server's reference for class drift."""
    if not val_files:
        return {}
    counts = [0] * checkpoint.header.num_classes
    for _, label in val_files:
        counts[label] += 1
    return {"val_class_counts": tuple(counts)}


def _golden_set(
    data_dir: Path | None,
    source: _Source,
    serving: ServingModel,
    graph_path: Path,
    extra: dict[str, Any],
) -> dict[str, bytes]:
    """The version's golden set files (none without val data); its summary goes in ``extra``."""
    if data_dir is None:
        return {}
    checkpoint, graph = source.checkpoint, source.graph
    golden, files = build_golden_set(
        Path(data_dir),
        source.val_files,
        classes=checkpoint.header.classes,
        preprocessing=checkpoint.header.preprocessing,
        serving=serving,
        onnx_path=graph_path,
        input_format=graph.input_format,
    )
    extra["golden_set"] = {
        "images": len(golden.images),
        "tolerance": golden.tolerance,
        "measured_max_abs_diff": golden.measured_max_abs_diff,
    }
    return files


def _run_split(data_dir: Path | None, split: str, checkpoint: Checkpoint) -> list[tuple[Path, int]]:
    """The training run's own ``split`` of ``data_dir`` (its seeded val share when the folder
    has no ``val/``), by the split settings the checkpoint recorded."""
    if data_dir is None:
        return []
    recorded = checkpoint.header.config
    rule = SplitRule(
        val_fraction=float(recorded.get("val_fraction", TrainConfig.val_fraction)),
        seed=int(recorded.get("seed", TrainConfig.seed)),
    )
    return list_split(Path(data_dir), split, checkpoint.header.classes, rule)


def _load(files: list[tuple[Path, int]], checkpoint: Checkpoint, limit: int) -> ImageSet | None:
    if not files:
        return None
    preprocessing = checkpoint.header.preprocessing
    return load_split(
        files,
        input_size=preprocessing.input_size,
        resize_size=preprocessing.resize_size,
        limit=limit,
    )


def _verify_fp32(
    path: Path, classifier: nn.Module, graph: _Graph, val: ImageSet | None
) -> ParityReport:
    _check(path, graph)
    return _parity(path, classifier, graph, val)


def _check(path: Path, graph: _Graph) -> None:
    """The ONNX checker and the graph's signature (inputs, outputs, shapes)."""
    check_signature(
        check_model(path),
        input_format=graph.input_format,
        input_size=graph.input_size,
        num_classes=graph.num_classes,
    )


def _parity(path: Path, classifier: nn.Module, graph: _Graph, val: ImageSet | None) -> ParityReport:
    """The graph's logits against PyTorch's on random and val images, two batch sizes."""
    return torch_parity(
        path,
        classifier,
        graph_input=graph.input,
        input_size=graph.input_size,
        val_images=None if val is None else val.images,
        tolerance=FP32_TOLERANCE,
    )


def _optimize(
    path: Path, work: Path, classifier: nn.Module, graph: _Graph, val: ImageSet | None
) -> tuple[Path, dict[str, object]]:
    optimized = work / "optimized.onnx"
    report = optimize_offline(path, optimized)
    if not report.is_smaller:
        return path, report.as_metadata(applied=False)
    try:
        _verify_fp32(optimized, classifier, graph, val)
    except ExportError as error:
        log.warning(
            "offline optimisation broke verification, keeping the exported graph: %s", error
        )
        return path, report.as_metadata(applied=False)
    return optimized, report.as_metadata(applied=True)


def _reduced_precision(
    fp32_path: Path, work: Path, source: _Source, options: _Options
) -> tuple[Path, ParityReport, dict[str, Any]]:
    """Step ``quantise``: the fp16 or int8 graph, its parity against the verified fp32 one,
    and its accuracy and latency beside fp32's (int8: within its accuracy budget)."""
    graph, val, calibration = source.graph, source.val, source.calibration
    precision, int8_mode = options.precision, options.int8_mode
    target = work / f"{precision}.onnx"
    val_images = None if val is None else val.images
    extra: dict[str, Any] = {}
    if precision == "fp16":
        convert_fp16(fp32_path, target)
        tolerance: float | None = FP16_RELATIVE_TOLERANCE
    else:
        quantize_int8(
            fp32_path,
            target,
            mode=int8_mode,
            calibration_images=None if calibration is None else calibration.images,
            graph_input=graph.input,
        )
        tolerance = None
        extra["int8"] = {
            "mode": int8_mode,
            "calibration_images": 0 if calibration is None else len(calibration),
            "accuracy_budget_points": options.int8_accuracy_budget,
        }
    model = check_model(target)
    check_signature(
        model,
        input_format=graph.input_format,
        input_size=graph.input_size,
        num_classes=graph.num_classes,
    )
    parity = onnx_parity(
        target,
        fp32_path,
        graph_input=graph.input,
        input_size=graph.input_size,
        val_images=val_images,
        tolerance=tolerance,
        relative=True,
    )
    latency_images = (
        val_images[:LATENCY_BATCH]
        if val_images is not None and len(val_images) >= LATENCY_BATCH
        else random_images(LATENCY_BATCH, graph.input_size, seed=0)
    )
    comparison = compare_with_fp32(
        target,
        fp32_path,
        val=val,
        latency_images=np.asarray(latency_images),
        graph_input=graph.input,
    )
    extra["precision_comparison"] = comparison.as_metadata()
    if precision == "int8":
        check_accuracy_budget(comparison, options.int8_accuracy_budget)
    return target, parity, extra
