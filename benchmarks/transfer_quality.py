"""Transfer quality: the trainer's defaults against the classic recipe, a probe and scratch.

On three tasks the project generates or ships, each fine-tuned from the same source model (a
ResNet-18 trained from scratch by the trainer on the demo's source task: there is no model hub
to download from):

- ``demo``: the demo's target task (arrows, crescents, L-shapes, rings at random angles).
- ``digits``: scikit-learn's bundled 8x8 handwritten digits, upscaled; flips change labels
  (2/5, 6/9 under a rotation), so a blind horizontal flip hurts.
- ``photo-patches``: patches of the two photographs scikit-learn ships (``china.jpg``,
  ``flower.jpg``), one class per region of a photograph; flips keep the label, and a source
  model trained on drawn shapes transfers poorly to photo textures.

Compared, with the same epoch budget:

- (a) ``trainer``: ``trainer train`` with default flags (converged probe, ``--augment auto``,
  calibration), only the epochs and the source weights given.
- (b) ``classic``: the plain torch loop of the tutorials: freeze; the head with BatchNorm in
  eval mode, tuned as an expert would (the best on val of ``CLASSIC_HEAD_GRID``'s LRs and
  epochs); then the top layer group at 1e-4 and the head at 1e-3; AdamW, one-cycle
  schedule, label smoothing 0.1; augmentation chosen by hand for each task (``HAND_AUGMENT``).
- (c) ``probe``: the trainer's linear probe alone (``--finetune-epochs 0``).
- (d) ``scratch``: the trainer with ``--weights none`` and default flags.

Reported: best val accuracy, head-phase val accuracy, ECE (15 bins, of the probabilities the
model would serve: the trainer's are temperature-scaled), wall seconds.

    .venv/bin/python benchmarks/transfer_quality.py

prints a table and writes ``bench-output/transfer_quality.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from trainer.checkpoint import load_checkpoint
from trainer.commands.demo_data import make_demo_data
from trainer.config import resolve_config
from trainer.evaluation.calibration import expected_calibration_error
from trainer.model.classifier import create_model, plain_state_dict
from trainer.run import train

SIZE = 32
BATCH = 32
HEAD_EPOCHS, FINETUNE_EPOCHS = 2, 8
TASKS = ("demo", "digits", "photo-patches")
METHODS = ("trainer", "classic", "probe", "scratch")
# Not run unless asked: the defaults with the weight interpolation after phase 2 (WiSE-FT).
OPTIONAL_METHODS = ("wise-ft",)
# The augmentation a practitioner would pick for each task after looking at it.
HAND_AUGMENT: dict[str, list[nn.Module]] = {
    "demo": [v2.RandomResizedCrop(SIZE, scale=(0.7, 1.0)), v2.RandomHorizontalFlip()],
    "digits": [v2.RandomResizedCrop(SIZE, scale=(0.7, 1.0)), v2.RandomRotation(10)],
    "photo-patches": [
        v2.RandomResizedCrop(SIZE, scale=(0.5, 1.0)),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
    ],
}


# ---- tasks ------------------------------------------------------------------------------------


def _save_split(root: Path, images: dict[str, list[Image.Image]], val_per_class: int) -> Path:
    for name, items in images.items():
        for i, image in enumerate(items):
            split = "val" if i < val_per_class else "train"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{name}-{i:04d}.png")
    return root


def digits_task(root: Path, train: int = 40, val: int = 25) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    images: dict[str, list[Image.Image]] = {}
    for label in range(10):
        chosen = rng.permutation(np.flatnonzero(digits.target == label))[: train + val]
        images[f"digit-{label}"] = [
            Image.fromarray((digits.images[i] * 15).astype(np.uint8))
            .resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            .convert("RGB")
            for i in chosen
        ]
    return _save_split(root, images, val)


def photo_patch_task(root: Path, train: int = 40, val: int = 25) -> Path:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: 427 x 640 RGB
    rng = np.random.default_rng(0)
    images: dict[str, list[Image.Image]] = {}
    for photo, name in zip(photos, ("china", "flower"), strict=True):
        height, width = photo.shape[:2]
        for strip in range(3):  # left, middle, right thirds: one class each
            left, right = strip * width // 3, (strip + 1) * width // 3
            patches = []
            for _ in range(train + val):
                y = int(rng.integers(0, height - 48))
                x = int(rng.integers(left, right - 48))
                patch = Image.fromarray(photo[y : y + 48, x : x + 48])
                patches.append(patch.resize((SIZE, SIZE), Image.Resampling.BILINEAR))
            images[f"{name}-{strip}"] = patches
    return _save_split(root, images, val)


# ---- (a), (c), (d): the trainer --------------------------------------------------------------


def run_trainer(data: Path, output: Path, **flags: Any) -> dict[str, Any]:
    shutil.rmtree(output, ignore_errors=True)  # a rerun in the same --work starts afresh
    base = {
        "data": data,
        "output": output,
        "image_size": SIZE,
        "batch_size": BATCH,
        "device": "cpu",
        "export": False,
        "resume": "never",
    }
    started = time.perf_counter()
    summary = train(resolve_config(environ={}, flags=base | flags))
    calibration = summary.get("calibration") or {}
    return {
        "best_val_accuracy": summary["best_val_accuracy"],
        "head_val_accuracy": summary.get("head_phase_val_accuracy"),
        "ece": calibration.get("ece_after"),
        "seconds": time.perf_counter() - started,
        "augment": summary.get("augment"),
        "init": (summary.get("init_choice") or {}).get("init"),
        "chosen": (summary.get("finetune_choice") or {}).get("unfreeze"),
        "weight_interpolation": summary.get("weight_interpolation"),
    }


# ---- (b): the classic recipe as a plain loop ---------------------------------------------------


# The classic recipe's head phase: (LR, epochs) tried, the best on val kept.
CLASSIC_HEAD_GRID = (
    (1e-3, HEAD_EPOCHS),
    (1e-2, HEAD_EPOCHS),
    (1e-2, 3 * HEAD_EPOCHS),
    (3e-2, 3 * HEAD_EPOCHS),
)


def classic_recipe(
    data: Path, source: Path, task: str, finetune_epochs: int, seed: int = 0
) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(seed)
    checkpoint = load_checkpoint(source)
    pre = checkpoint.header.preprocessing
    normalise = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(pre.mean, pre.std),
    ]
    train_set = datasets.ImageFolder(
        str(data / "train"), v2.Compose([*HAND_AUGMENT[task], *normalise])
    )
    val_set = datasets.ImageFolder(
        str(data / "val"), v2.Compose([v2.Resize(SIZE), v2.CenterCrop(SIZE), *normalise])
    )
    train_loader = DataLoader(train_set, batch_size=BATCH, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=2 * BATCH)
    model = create_model("resnet18", len(train_set.classes))
    state = {
        k: v
        for k, v in plain_state_dict(checkpoint.best_state[0]).items()
        if not k.startswith("fc.")
    }
    model.load_state_dict(state, strict=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.requires_grad_(True)
    # The expert tunes the head: every point of a small grid from the same fresh head, the best
    # on val goes on to phase 2 (the trainer's probe chooses its L2 on val too).
    fresh = {k: v.clone() for k, v in model.fc.state_dict().items()}
    heads = []
    for lr, epochs in CLASSIC_HEAD_GRID:
        model.fc.load_state_dict(fresh)
        scored = _classic_phase(
            model, [(model.fc, lr)], epochs, train_loader, val_loader, loss_fn, bn_eval=True
        )
        heads.append(
            (scored, (lr, epochs), {k: v.clone() for k, v in model.fc.state_dict().items()})
        )
    head_best, head_setting, head_state = max(heads, key=lambda h: h[0][0])
    model.fc.load_state_dict(head_state)
    model.layer4.requires_grad_(True)
    best = _classic_phase(
        model,
        [(model.layer4, 1e-4), (model.fc, 1e-3)],
        finetune_epochs,
        train_loader,
        val_loader,
        loss_fn,
        bn_eval=False,
    )
    accuracy, probabilities, labels = best if best[0] >= head_best[0] else head_best
    return {
        "best_val_accuracy": accuracy,
        "head_val_accuracy": head_best[0],
        "ece": expected_calibration_error(probabilities, labels),
        "seconds": time.perf_counter() - started,
        "chosen": f"head lr {head_setting[0]:g} x {head_setting[1]} epochs",
        "head_grid": [
            {"lr": lr, "epochs": epochs, "val_accuracy": scored[0]}
            for scored, (lr, epochs), _ in heads
        ],
    }


def _classic_phase(model, groups, epochs, train_loader, val_loader, loss_fn, *, bn_eval):  # noqa: PLR0913  one phase of the plain loop
    optimizer = torch.optim.AdamW([{"params": m.parameters(), "lr": lr} for m, lr in groups])
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[lr for _, lr in groups], total_steps=epochs * len(train_loader)
    )
    best: tuple[float, torch.Tensor, torch.Tensor] = (-1.0, torch.zeros(0), torch.zeros(0))
    for _ in range(epochs):
        model.eval() if bn_eval else model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss_fn(model(images), labels).backward()
            optimizer.step()
            schedule.step()
        scored = _evaluate(model, val_loader)
        if scored[0] > best[0]:
            best = scored
    return best


@torch.no_grad()
def _evaluate(model, loader) -> tuple[float, torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        logits.append(model(images))
        labels.append(targets)
    probabilities, truth = torch.cat(logits).softmax(1), torch.cat(labels)
    return float((probabilities.argmax(1) == truth).float().mean()), probabilities, truth


# ---- the table ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench-output/transfer_quality.json"))
    parser.add_argument("--source-epochs", type=int, default=12, help="source model epochs")
    parser.add_argument("--epochs", type=int, default=FINETUNE_EPOCHS, help="phase-2 epochs")
    parser.add_argument("--per-class", type=int, default=40, help="training images per class")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the generated data and the source model here and reuse them when present "
        "(default: a temporary folder)",
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="run every cell with each seed (the trainer's --seed; the classic loop's torch "
        "seed) and report the mean and the spread",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of {', '.join(METHODS + OPTIONAL_METHODS)}",
    )
    args = parser.parse_args()
    unknown = set(args.methods.split(",")) - set(METHODS + OPTIONAL_METHODS) - {""}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}: choose from {METHODS + OPTIONAL_METHODS}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with contextlib.ExitStack() as stack:
        work = args.work or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="transfer-quality-"))
        )
        results = measure(
            work,
            source_epochs=args.source_epochs,
            epochs=args.epochs,
            per_class=args.per_class,
            tasks=[t for t in args.tasks.split(",") if t],
            methods=[m for m in args.methods.split(",") if m],
            seeds=args.seeds,
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def measure(  # noqa: PLR0913  the script's options
    work: Path,
    *,
    source_epochs: int,
    epochs: int,
    per_class: int,
    tasks: list[str],
    methods: list[str],
    seeds: list[int],
) -> dict[str, Any]:
    """Every (task, method) row, per seed and their mean; the source model is trained once
    per ``work`` folder."""
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "image_size": SIZE, "tasks": {}}
    if not (work / "demo").is_dir():
        make_demo_data(work / "demo")
    source = work / "source" / "checkpoints" / "best.pt"
    if not source.is_file():
        started = time.perf_counter()
        run_trainer(
            work / "demo" / "source", work / "source", weights="none", finetune_epochs=source_epochs
        )
        results["source_seconds"] = time.perf_counter() - started
    builders = {
        "demo": lambda: work / "demo" / "target",
        "digits": lambda: digits_task(work / "digits", train=per_class),
        "photo-patches": lambda: photo_patch_task(work / "patches", train=per_class),
    }
    for task in tasks:
        data = builders[task]()
        rows: dict[str, Any] = {}
        for method in methods:
            runs = [
                run_method(method, task, data, source, work / task, epochs, seed) for seed in seeds
            ]
            rows[method] = _mean_row(runs, seeds)
        results["tasks"][task] = rows
        print_rows(task, rows)
    return results


def run_method(  # noqa: PLR0913  one cell of the table
    method: str, task: str, data: Path, source: Path, work: Path, epochs: int, seed: int = 0
) -> dict[str, Any]:
    """One method's row on one task with one seed (outputs under ``work``)."""
    if method == "classic":
        return classic_recipe(data, source, task, epochs, seed)
    if method == "probe":
        return run_trainer(data, work / "c", weights=str(source), finetune_epochs=0, seed=seed)
    if method == "scratch":
        scratch_epochs = HEAD_EPOCHS + epochs
        return run_trainer(
            data, work / "d", weights="none", finetune_epochs=scratch_epochs, seed=seed
        )
    defaults = {"weights": str(source), "head_epochs": HEAD_EPOCHS, "finetune_epochs": epochs}
    if method == "wise-ft":
        return run_trainer(data, work / "e", **defaults, weight_interpolation="on", seed=seed)
    return run_trainer(data, work / "a", **defaults, seed=seed)


def _mean_row(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The seeds' mean of every number (``min``/``max`` of the accuracy beside it), the first
    run's other facts, and every run."""
    row = dict(runs[0])
    for key, value in runs[0].items():
        values = [run[key] for run in runs]
        if isinstance(value, float) and all(isinstance(v, float) for v in values):
            row[key] = float(np.mean(values))
    accuracies = [run["best_val_accuracy"] for run in runs]
    row |= {"min_val_accuracy": min(accuracies), "max_val_accuracy": max(accuracies)}
    row["seeds"] = {seed: run for seed, run in zip(seeds, runs, strict=True)}
    return row


def print_rows(task: str, rows: dict[str, dict[str, Any]]) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"\n{task}")
    print(
        f"  {'method':<9} {'best val':>9} {'range':>13} {'head phase':>11} {'ECE':>7} "
        f"{'seconds':>8}  chosen (first seed)"
    )
    for method, row in rows.items():
        chosen = " ".join(
            f"{key} {row[key]}" for key in ("init", "chosen") if row.get(key) is not None
        )
        spread = f"{row['min_val_accuracy']:.3f}-{row['max_val_accuracy']:.3f}"
        print(
            f"  {method:<9} {fmt(row['best_val_accuracy'], '.3f'):>9} {spread:>13} "
            f"{fmt(row['head_val_accuracy'], '.3f'):>11} {fmt(row['ece'], '.3f'):>7} "
            f"{row['seconds']:>8.1f}  {chosen}"
        )


if __name__ == "__main__":
    sys.exit(main())
