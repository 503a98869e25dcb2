"""The end-of-training report: curves, confusion matrix and per-class scores.

``write_report`` reads the run's ``metrics.jsonl`` and the validation confusion matrix and
writes three files into ``report_dir``:

- ``curves.png``: train/val loss, val accuracy (on a fixed 0-1 axis with chance level
  1/classes drawn, so a run below chance cannot pass for progress), the learning rate of every
  parameter group per optimizer step (the schedule is per step: warmup, then cosine; records
  without ``step_lrs`` fall back to one point per epoch) and throughput over global epochs,
  with the head -> finetune boundary marked.
- ``confusion_matrix.png``: counts in the cells, colours normalised per true class (so a
  rare class is as visible as a common one), class names on both axes.
- ``per_class.json``: precision, recall, F1 and support per class, overall accuracy, macro
  and support-weighted averages.
- ``lr_find.png``, when the run's LR range test left ``lr_find.json`` in ``report_dir``
  (``trainer.finetune.lr_finder``): loss against learning rate, raw and smoothed, with the
  suggestion.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas: no pyplot, so no
global figure registry and no backend switch in the caller's process.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from contracts.atomic_files import atomic_write_bytes

REQUIRED_KEYS = ("phase", "global_epoch", "train_loss", "val_loss", "val_accuracy")
MAX_LABEL_CHARS = 28
MAX_ANNOTATED_CLASSES = 30
PHASE_COLOURS = {"head": "#fff3d6", "finetune": "#e3f0fb"}
DPI = 110
# Below this val accuracy the "best" label goes above its point (the axis is fixed at 0-1).
LOW_ACCURACY_LABEL = 0.15


@dataclass
class _History:
    """The metrics file as columns, one entry per global epoch (sorted)."""

    global_epoch: list[int] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    images_per_second: list[float] = field(default_factory=list)
    lrs: dict[str, list[float]] = field(default_factory=dict)
    # Per group, the LR curve as points (x in global epochs): one per recorded optimizer step
    # of an epoch, else one at the epoch (older records); NaN breaks the line where the group
    # was not trained.
    lr_curves: dict[str, _LrCurve] = field(default_factory=dict)

    @property
    def has_step_lrs(self) -> bool:
        return any(curve.step_points for curve in self.lr_curves.values())


@dataclass
class _LrCurve:
    """One parameter group's learning rate over the run, as plotted."""

    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    # Indices of the points that stand for a whole epoch (drawn with a marker).
    epoch_points: list[int] = field(default_factory=list)
    step_points: int = 0

    def add_epoch(self, x: float, lr: float) -> None:
        self.epoch_points.append(len(self.x))
        self.x.append(x)
        self.y.append(lr)

    def add_steps(self, xs: list[float], lrs: list[float]) -> None:
        self.x += xs
        self.y += lrs
        self.step_points += len(xs)

    def break_line(self) -> None:
        if self.y and not math.isnan(self.y[-1]):
            self.x.append(self.x[-1])
            self.y.append(math.nan)


def write_report(
    report_dir: Path,
    metrics_path: Path,
    confusion: np.ndarray,
    classes: list[str],
) -> None:
    """Write ``curves.png``, ``confusion_matrix.png`` and ``per_class.json`` into ``report_dir``.

    Args:
        report_dir: output folder, created if missing.
        metrics_path: the run's ``metrics.jsonl`` (one JSON object per epoch). A resumed run
            that wrote the same ``global_epoch`` twice is plotted with the last line.
        confusion: ``[C, C]`` integer counts, rows = true class, columns = predicted class.
        classes: the C class names in output order.

    Raises:
        ValueError: the metrics file is missing, empty or malformed (naming the line and key),
            or the confusion matrix does not match ``classes``.
    """
    matrix = _check_confusion(confusion, classes)
    history = read_metrics(Path(metrics_path))
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    _save_figure(_curves_figure(history, len(classes)), report_dir / "curves.png")
    _save_figure(_confusion_figure(matrix, classes), report_dir / "confusion_matrix.png")
    scores = per_class_scores(matrix, classes)
    atomic_write_bytes(report_dir / "per_class.json", json.dumps(scores, indent=2).encode() + b"\n")
    if (report_dir / "lr_find.json").is_file():
        curve = _read_lr_find(report_dir / "lr_find.json")
        _save_figure(_lr_find_figure(*curve), report_dir / "lr_find.png")


def _read_lr_find(path: Path) -> tuple[list[float], list[float], list[float], float]:
    """The range test's learning rates, raw and smoothed losses, and suggestion."""
    try:
        found = json.loads(path.read_text())
        columns = [[float(v) for v in found[key]] for key in ("lrs", "losses", "smoothed")]
        suggestion = float(found["suggestion"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an LR range test record ({exc})") from None
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"{path}: lrs, losses and smoothed differ in length")
    return columns[0], columns[1], columns[2], suggestion


def _lr_find_figure(
    lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float
) -> Figure:
    fig = Figure(figsize=(6.4, 4.0), dpi=DPI)
    axis = fig.add_subplot()
    axis.plot(lrs, losses, color="#bbbbbb", linewidth=1, label="loss per step")
    finite = [v if math.isfinite(v) else math.nan for v in smoothed]
    axis.plot(lrs, finite, color="#1f77b4", linewidth=2, label="smoothed")
    axis.axvline(suggestion, color="#d62728", linestyle="--", label=f"chosen lr {suggestion:.1e}")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate of the top unfrozen group (one step each)")
    axis.set_ylabel("training loss")
    axis.set_title("LR range test before phase 2")
    axis.legend(loc="upper left", fontsize="small")
    return fig


def read_metrics(metrics_path: Path) -> _History:
    """Parse ``metrics.jsonl`` into columns sorted by global epoch.

    Optional per-step learning rates (``steps_per_epoch``, ``lr_steps``: step indices within
    the epoch, ``step_lrs``: ``{group: [lr per listed step]}``) become the LR curves; a record
    without them (files of older runs) gives one point per epoch from ``lrs``.

    Raises:
        ValueError: missing or empty file, a line that is not a JSON object, a line without
            one of the required keys, or malformed learning rates (naming the line).
    """
    rows = _read_rows(metrics_path)
    history = _History()
    for index, (where, row) in enumerate(rows):
        history.global_epoch.append(int(row["global_epoch"]))
        history.phase.append(str(row["phase"]))
        history.train_loss.append(_float(row["train_loss"]))
        history.val_loss.append(_float(row["val_loss"]))
        history.val_accuracy.append(_float(row["val_accuracy"]))
        history.images_per_second.append(_float(row.get("images_per_second")))
        lrs = row.get("lrs")
        if lrs is None:  # also accept flat "lr/<group>" keys beside the others
            lrs = {key: value for key, value in row.items() if key.startswith("lr/")} or None
        named = _named_lrs(lrs, str(row["phase"]), where=where)
        for name, lr in named.items():
            series = history.lrs.setdefault(name, [math.nan] * len(rows))
            series[index] = lr
        _add_lr_points(history, row, named, where)
    return history


def _read_rows(metrics_path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The records with where each was read (``file:line``), sorted by global epoch; a
    ``global_epoch`` written twice (a resumed run) keeps its last line."""
    if not metrics_path.is_file():
        raise ValueError(f"metrics file not found: {metrics_path}")
    rows: dict[int, tuple[str, dict[str, Any]]] = {}
    with metrics_path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{metrics_path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in REQUIRED_KEYS if key not in row]
            if missing:
                raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
            try:
                rows[int(row["global_epoch"])] = (where, row)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{where}: global_epoch must be an integer, got {row['global_epoch']!r}"
                ) from None
    if not rows:
        raise ValueError(f"{metrics_path}: no epoch records to plot")
    return [rows[key] for key in sorted(rows)]


def _add_lr_points(
    history: _History, row: dict[str, Any], named: dict[str, float], where: str
) -> None:
    """Extend each group's LR curve by this record: its steps, or one point at the epoch."""
    steps = _step_lrs(row, where)
    present = set(steps[1] if steps is not None else named)
    for name, curve in history.lr_curves.items():
        if name not in present:
            curve.break_line()
    if steps is not None:
        xs, groups = steps
        for name, values in groups.items():
            history.lr_curves.setdefault(name, _LrCurve()).add_steps(xs, values)
    else:
        for name, lr in named.items():
            history.lr_curves.setdefault(name, _LrCurve()).add_epoch(float(row["global_epoch"]), lr)


def _step_lrs(row: dict[str, Any], where: str) -> tuple[list[float], dict[str, list[float]]] | None:
    """The per-step learning rates of one record with their x positions, or None if absent.

    Step ``j`` of ``steps_per_epoch`` in global epoch ``g`` sits at
    ``g - 0.5 + (j + 0.5) / steps_per_epoch``: inside the epoch's band of the plot.
    """
    if row.get("step_lrs") is None:
        return None
    per_epoch = row.get("steps_per_epoch")
    if isinstance(per_epoch, bool) or not isinstance(per_epoch, int) or per_epoch < 1:
        raise ValueError(f"{where}: steps_per_epoch must be a positive integer, got {per_epoch!r}")
    steps = row.get("lr_steps")
    if not isinstance(steps, list) or not all(
        isinstance(j, int) and not isinstance(j, bool) and 0 <= j < per_epoch for j in steps
    ):
        raise ValueError(
            f"{where}: lr_steps must list step indices from 0 to steps_per_epoch - 1 "
            f"({per_epoch - 1}), got {steps!r}"
        )
    step_lrs = row["step_lrs"]
    if not isinstance(step_lrs, dict):
        raise ValueError(f"{where}: step_lrs must be a dict of group -> list of learning rates")
    groups: dict[str, list[float]] = {}
    for name, values in step_lrs.items():
        if not isinstance(values, list) or len(values) != len(steps):
            raise ValueError(
                f"{where}: step_lrs[{name!r}] must list {len(steps)} learning rates, one per "
                "entry of lr_steps"
            )
        try:
            groups[str(name)] = [_float(value) for value in values]
        except ValueError as err:
            raise ValueError(f"{where}: step_lrs[{name!r}]: {err}") from None
    epoch = int(row["global_epoch"])
    return [epoch - 0.5 + (j + 0.5) / per_epoch for j in steps], groups


def _named_lrs(lrs: Any, phase: str, where: str) -> dict[str, float]:
    """A dict is keyed by group name already (an ``lr/`` prefix is dropped); a list is
    positional, and positions mean different groups in different phases, so list entries are
    named per phase."""
    if lrs is None:
        return {}
    if isinstance(lrs, dict):
        return {str(name).removeprefix("lr/"): _float(lr) for name, lr in lrs.items()}
    if isinstance(lrs, list | tuple):
        if len(lrs) == 1:
            return {f"{phase}": _float(lrs[0])}
        return {f"{phase} group {i}": _float(lr) for i, lr in enumerate(lrs)}
    raise ValueError(f"{where}: lrs must be a dict or a list, got {type(lrs).__name__}")


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None


def _check_confusion(confusion: Any, classes: Sequence[str]) -> np.ndarray:
    matrix = np.asarray(confusion)
    count = len(classes)
    if count < 1:
        raise ValueError("classes must name at least one class")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {matrix.shape}")
    if matrix.shape[0] != count:
        raise ValueError(
            f"confusion matrix is {matrix.shape[0]}x{matrix.shape[1]} but {count} class "
            "names were given"
        )
    if not np.issubdtype(matrix.dtype, np.integer):
        raise ValueError(f"confusion matrix must hold integer counts, got dtype {matrix.dtype}")
    if (matrix < 0).any():
        raise ValueError("confusion matrix has negative counts")
    return matrix.astype(np.int64)


def per_class_scores(confusion: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support per class from a confusion matrix.

    A class never predicted has precision 0 and a class with no validation images has recall
    0 (scikit-learn's ``zero_division=0``), so the JSON never holds NaN.
    """
    matrix = np.asarray(confusion, dtype=np.int64)
    true_positive = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = np.divide(
        true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0
    )
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    total = int(matrix.sum())
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    weights = support / total if total else np.zeros_like(true_positive)
    return {
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "total": total,
        "macro_avg": {
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
        },
        "weighted_avg": {
            "precision": float((precision * weights).sum()),
            "recall": float((recall * weights).sum()),
            "f1": float((f1 * weights).sum()),
        },
        "per_class": per_class,
    }


def _shade_phases(axis: Any, history: _History) -> None:
    """Background band per phase and a dashed line where the head phase hands over."""
    epochs, phases = history.global_epoch, history.phase
    start = 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            axis.axvspan(
                epochs[start] - 0.5,
                epochs[i - 1] + 0.5,
                color=PHASE_COLOURS.get(phases[start], "#eeeeee"),
                zorder=0,
                linewidth=0,
            )
            if i < len(phases):
                boundary = (epochs[i - 1] + epochs[i]) / 2
                axis.axvline(boundary, color="#555555", linestyle="--", linewidth=1.2, zorder=1)
            start = i


def _boundary_label(history: _History) -> str:
    for i in range(1, len(history.phase)):
        if history.phase[i] != history.phase[i - 1]:
            last = history.global_epoch[i - 1]
            return f"{history.phase[i - 1]} -> {history.phase[i]} after epoch {last}"
    return f"single phase: {history.phase[0]}"


def _plot_accuracy(axis: Any, history: _History, num_classes: int, style: dict[str, Any]) -> None:
    """Val accuracy on a fixed 0-1 axis with chance level: an auto-scaled axis makes a run
    wandering between 18% and 22% of five classes look like steady progress."""
    x = history.global_epoch
    axis.plot(x, history.val_accuracy, label="val accuracy", color="#2ca02c", **style)
    if num_classes >= 1:
        chance = 1.0 / num_classes
        axis.axhline(
            chance,
            color="#7f7f7f",
            linestyle="--",
            linewidth=1.2,
            label=f"chance (1/{num_classes} = {chance:.1%})",
            zorder=2,
        )
    accuracies = np.asarray(history.val_accuracy, dtype=np.float64)
    if np.isfinite(accuracies).any():
        best = int(np.nanargmax(accuracies))
        axis.scatter(
            [x[best]],
            [accuracies[best]],
            s=120,
            facecolors="none",
            edgecolors="black",
            zorder=5,
            clip_on=False,
        )
        axis.annotate(
            f"best {accuracies[best]:.1%} (epoch {x[best]})",
            (x[best], accuracies[best]),
            textcoords="offset points",
            # below the point, unless that is off the bottom of the fixed axis
            xytext=(0, -18 if accuracies[best] >= LOW_ACCURACY_LABEL else 10),
            # keep the label inside the axes when the best epoch is at either end
            ha="right" if best > len(x) / 2 else "left" if len(x) > 1 else "center",
            fontsize=9,
        )
    axis.set_ylim(0.0, 1.0)
    axis.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axis.set_title("Validation accuracy")
    axis.set_ylabel("accuracy")


def _plot_learning_rates(axis: Any, history: _History, style: dict[str, Any]) -> None:
    """One line per parameter group: per optimizer step where recorded, else per epoch."""
    if not history.lr_curves:
        axis.text(0.5, 0.5, "learning rates not recorded", ha="center", transform=axis.transAxes)
    for name, curve in history.lr_curves.items():
        if curve.step_points:
            (line,) = axis.plot(curve.x, curve.y, label=name, linewidth=1.6)
            if curve.epoch_points:  # older records of the same group: one point per epoch
                axis.plot(
                    [curve.x[i] for i in curve.epoch_points],
                    [curve.y[i] for i in curve.epoch_points],
                    linestyle="none",
                    marker="o",
                    markersize=4,
                    color=line.get_color(),
                )
        else:
            axis.plot(curve.x, curve.y, label=name, **style)
    values = [v for curve in history.lr_curves.values() for v in curve.y if math.isfinite(v)]
    if values and min(values) > 0:
        axis.set_yscale("log")
    per_step = history.has_step_lrs
    axis.set_title(
        "Learning rate per parameter group" + (", per optimizer step" if per_step else "")
    )
    axis.set_ylabel("learning rate")


def _curves_figure(history: _History, num_classes: int) -> Figure:
    fig = Figure(figsize=(12, 8.5), dpi=DPI, layout="constrained")
    loss_ax, acc_ax, lr_ax, speed_ax = fig.subplots(2, 2, sharex=True).flat
    x = history.global_epoch
    style = {"marker": "o", "markersize": 4, "linewidth": 1.8}

    loss_ax.plot(x, history.train_loss, label="train loss", color="#1f77b4", **style)
    loss_ax.plot(x, history.val_loss, label="val loss", color="#d62728", **style)
    loss_ax.set_title("Loss")
    loss_ax.set_ylabel("cross-entropy")

    _plot_accuracy(acc_ax, history, num_classes, style)
    _plot_learning_rates(lr_ax, history, style)

    speed_ax.plot(x, history.images_per_second, label="train images/s", color="#9467bd", **style)
    speed_ax.set_title("Training throughput")
    speed_ax.set_ylabel("images / second")
    speed_ax.set_ylim(bottom=0)

    for axis in (loss_ax, acc_ax, lr_ax, speed_ax):
        _shade_phases(axis, history)
        axis.grid(True, alpha=0.35)
        axis.set_xlim(x[0] - 0.5, x[-1] + 0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="best", fontsize=9, framealpha=0.9)
    for axis in (lr_ax, speed_ax):
        axis.set_xlabel("global epoch")
    if history.has_step_lrs:
        lr_ax.set_xlabel("global epoch (each epoch's steps spread across its band)")
    fig.suptitle(
        f"Training curves ({_boundary_label(history)}; shaded: "
        + ", ".join(f"{p} phase" for p in dict.fromkeys(history.phase))
        + ")",
        fontsize=12,
    )
    return fig


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "\u2026"


def write_confusion_figure(
    path: Path, confusion: Any, classes: Sequence[str], *, subject: str
) -> None:
    """Write the confusion-matrix figure of ``write_report`` alone (``trainer evaluate``).

    Args:
        path: the PNG to write (atomically; its folder is created).
        confusion: ``[C, C]`` integer counts, rows = true class, columns = predicted class.
        classes: the C class names in output order.
        subject: what the images are, for the title (``validation``, a folder's name).

    Raises:
        ValueError: the confusion matrix does not match ``classes``.
    """
    matrix = _check_confusion(confusion, classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(_confusion_figure(matrix, classes, subject), path)


def _confusion_figure(
    matrix: np.ndarray, classes: Sequence[str], subject: str = "validation"
) -> Figure:
    count = len(classes)
    labels = [_short(name) for name in classes]
    longest = max(len(label) for label in labels)
    label_room = 0.09 * longest  # inches for the rotated / left labels
    cell = 0.55 if count <= 12 else 0.4 if count <= MAX_ANNOTATED_CLASSES else 0.25
    side = min(30.0, max(4.5, cell * count + 1.5))
    fig = Figure(
        figsize=(side + label_room + 1.5, side + label_room), dpi=DPI, layout="constrained"
    )
    axis = fig.subplots()
    support = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(
        matrix, support, out=np.zeros(matrix.shape, dtype=np.float64), where=support > 0
    )
    image = axis.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    colorbar.set_label("share of the true class")
    colorbar.ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    font = 10 if count <= 12 else 8 if count <= MAX_ANNOTATED_CLASSES else 7
    axis.set_xticks(range(count), labels, rotation=45, ha="right", fontsize=font)
    axis.set_yticks(range(count), labels, fontsize=font)
    if count <= MAX_ANNOTATED_CLASSES:
        for row in range(count):
            for col in range(count):
                axis.text(
                    col,
                    row,
                    str(int(matrix[row, col])),
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if normalised[row, col] > 0.5 else "black",
                )
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    total = int(matrix.sum())
    accuracy = np.trace(matrix) / total if total else 0.0
    axis.set_title(
        f"Confusion matrix ({subject}, {total} images, accuracy {accuracy:.1%})\n"
        "cells: counts; colour: share of the row's true class"
    )
    return fig


def _save_figure(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    # tight bounding box: long rotated class names are never cut off at the edge
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15)
    # Readable by others (0644): the report is for people to read.
    atomic_write_bytes(path, buffer.getvalue())
