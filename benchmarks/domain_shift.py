"""Domain shift: does ``--unlabeled-data`` close the gap between the lab and the field?

A task built offline in the manner of MNIST -> MNIST-M (Ganin & Lempitsky 2015), from data
scikit-learn ships: the **lab** images are its 8x8 handwritten digits, upscaled, white on
black; the **field** images are other digits of the same set drawn into random patches of its
two sample photographs (``|patch - 255 * digit|`` per channel, MNIST-M's blend). The trainer
sees labelled lab images and, in the second row, unlabelled field images; the field test set
is never seen by any run. Every run starts from the same source model as
``transfer_quality.py`` (a ResNet-18 the trainer trained from scratch on the demo's source
task), with the trainer's defaults and the same epochs:

- ``lab only``: ``trainer train`` on the lab images.
- ``lab + unlabeled``: the same, with ``--unlabeled-data`` pointing at the field images
  (MMD feature alignment in phase 2, AdaBN kept when lab val does not drop).
- ``field reference``: ``trainer train`` on labelled field images, as many as the lab's: what
  labels from the field would give.
- ``retrain``: the production loop's retrain: ``--weights`` the ``lab only`` run's
  ``best.pt`` (its Fisher information inside) on the grown data, lab and labelled field
  images together (train and val), as ``trainer ingest`` leaves them. Its lab val is the
  previous version's val split, scored before (the ``lab only`` row) and after.

Reported per row and seed: accuracy on the field test set and on the lab val split, and the
share of the gap between ``lab only`` and ``field reference`` that ``lab + unlabeled``
closes.

    .venv/bin/python benchmarks/domain_shift.py --work /tmp/tq --seeds 0 1 2
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
from transfer_quality import HEAD_EPOCHS, SIZE, run_trainer

from trainer.commands.demo_data import make_demo_data
from trainer.commands.evaluate import evaluate_folder, load_checkpoint_model

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("lab only", "lab + unlabeled", "field reference", "retrain")


def _lab_image(digit: np.ndarray) -> Image.Image:
    pixels = (digit * 15).astype(np.uint8)  # 0..16 -> 0..240
    return Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BICUBIC).convert("RGB")


def _field_image(digit: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator):
    strokes = np.asarray(_lab_image(digit), dtype=np.int16)
    photo = photos[int(rng.integers(len(photos)))]
    y = int(rng.integers(0, photo.shape[0] - SIZE))
    x = int(rng.integers(0, photo.shape[1] - SIZE))
    patch = photo[y : y + SIZE, x : x + SIZE].astype(np.int16)
    return Image.fromarray(np.abs(patch - strokes).astype(np.uint8))


def build_task(root: Path, per_class: int, test_per_class: int) -> dict[str, Path]:
    """The lab data (train/val), the unlabelled field folder, labelled field data for the
    reference (train/val) and the field test folder, from disjoint digit images."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    photos = list(load_sample_images().images)
    rng = np.random.default_rng(0)
    val = max(5, per_class // 4)
    parts = {
        "lab": root / "lab",
        "unlabeled": root / "field-unlabeled",
        "field": root / "field",
        "test": root / "field-test",
    }
    if all(p.is_dir() for p in parts.values()):
        return parts
    for label in range(10):
        chosen = rng.permutation(np.flatnonzero(digits.target == label))
        need = 2 * (per_class + val) + per_class + test_per_class
        if len(chosen) < need:
            raise SystemExit(f"digit {label}: {len(chosen)} images, the task needs {need}")
        cuts = np.cumsum([per_class, val, per_class, per_class, val, test_per_class])
        lab_train, lab_val, unlabeled, field_train, field_val, test = np.split(chosen, cuts)[:6]
        name = f"digit-{label}"
        writes = [
            (parts["lab"] / "train" / name, lab_train, False),
            (parts["lab"] / "val" / name, lab_val, False),
            (parts["unlabeled"], unlabeled, True),
            (parts["field"] / "train" / name, field_train, True),
            (parts["field"] / "val" / name, field_val, True),
            (parts["test"] / name, test, True),
        ]
        for folder, indices, field in writes:
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices:
                image = digits.images[i]
                picture = _field_image(image, photos, rng) if field else _lab_image(image)
                # Unlabelled files carry no class in their name either.
                stem = f"{i:04d}" if folder == parts["unlabeled"] else f"{name}-{i:04d}"
                picture.save(folder / f"{stem}.png")
    return parts


def source_model(work: Path, source_epochs: int) -> Path:
    """The source checkpoint ``transfer_quality.py`` uses, trained here when ``work`` has none."""
    source = work / "source" / "checkpoints" / "best.pt"
    if not source.is_file():
        if not (work / "demo").is_dir():
            make_demo_data(work / "demo")
        run_trainer(
            work / "demo" / "source", work / "source", weights="none", finetune_epochs=source_epochs
        )
    return source


def grown_data(parts: dict[str, Path], root: Path) -> Path:
    """Lab and labelled field images in one ImageFolder (train and val): the retrain's data."""
    if not root.is_dir():
        for origin in ("lab", "field"):
            for image in parts[origin].glob("*/*/*.png"):
                split, label = image.parent.parent.name, image.parent.name
                target = root / split / label / f"{origin}-{image.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image, target)
    return root


def run_row(row: str, parts: dict[str, Path], source: Path, out: Path, **flags: Any) -> dict:
    data = {"field reference": parts["field"], "retrain": parts.get("grown")}.get(row, parts["lab"])
    extra = {"unlabeled_data": parts["unlabeled"]} if row == "lab + unlabeled" else {}
    if row == "retrain":  # from the lab-only version of the same seed
        source = out.parent / out.name.replace("retrain", "lab-only") / "checkpoints" / "best.pt"
    trained = run_trainer(data, out, weights=str(source), head_epochs=HEAD_EPOCHS, **flags, **extra)
    model = load_checkpoint_model(out / "checkpoints" / "best.pt")
    return {
        "field_test_accuracy": evaluate_folder(model, parts["test"]).top1,
        "lab_val_accuracy": evaluate_folder(model, parts["lab"] / "val").top1,
        "seconds": trained["seconds"],
    }


def summarise(rows: dict[str, list[dict]]) -> dict[str, Any]:
    """Mean and spread per row, and the share of the gap the unlabelled images close."""

    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "min": min(values), "max": max(values)}

    summary: dict[str, Any] = {
        row: {key: stats([r[key] for r in runs]) for key in runs[0]} for row, runs in rows.items()
    }
    lab = summary["lab only"]["field_test_accuracy"]["mean"]
    adapted = summary["lab + unlabeled"]["field_test_accuracy"]["mean"]
    field = summary["field reference"]["field_test_accuracy"]["mean"]
    summary["gap_closed"] = (adapted - lab) / (field - lab) if field > lab else None
    summary["lab_val_cost"] = (
        summary["lab only"]["lab_val_accuracy"]["mean"]
        - summary["lab + unlabeled"]["lab_val_accuracy"]["mean"]
    )
    if "retrain" in summary:
        retrain = summary["retrain"]
        summary["retrain_field_below_reference"] = field - retrain["field_test_accuracy"]["mean"]
        summary["retrain_old_val_change"] = (
            retrain["lab_val_accuracy"]["mean"] - summary["lab only"]["lab_val_accuracy"]["mean"]
        )
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keep data and source here")
    parser.add_argument("--source-epochs", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8, help="phase-2 epochs of every run")
    parser.add_argument("--per-class", type=int, default=40, help="labelled images per class")
    parser.add_argument("--test-per-class", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output", type=Path, default=ROOT / "bench-output" / "domain_shift.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.time()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        source = source_model(work, args.source_epochs)
        parts = build_task(work / "shift", args.per_class, args.test_per_class)
        parts["grown"] = grown_data(parts, work / "shift" / "grown")
        rows: dict[str, list[dict]] = {row: [] for row in ROWS}
        for seed in args.seeds:
            for row in ROWS:
                out = work / "shift-runs" / f"{row.replace(' ', '-')}-{seed}"
                result = run_row(row, parts, source, out, finetune_epochs=args.epochs, seed=seed)
                rows[row].append(result)
                print(
                    f"seed {seed} {row:<16} field test {result['field_test_accuracy']:.3f}  "
                    f"lab val {result['lab_val_accuracy']:.3f}  {result['seconds']:.0f} s",
                    flush=True,
                )
    summary = summarise(rows)
    closed = summary["gap_closed"]
    print(
        f"gap closed by --unlabeled-data: {'n/a' if closed is None else f'{closed:.2f}'}; "
        f"lab val cost {summary['lab_val_cost']:+.3f}; retrain: field test "
        f"{summary['retrain_field_below_reference']:+.3f} below the reference, old val "
        f"{summary['retrain_old_val_change']:+.3f}"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {"seconds": time.time() - started, "seeds": args.seeds, "rows": rows, **summary}
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
