"""``trainer ingest``: move reviewed production captures into the training set.

The server can capture images it was unsure about (``--capture-dir``); a person labels them
with any tool that exports a CSV of ``path,label`` (paths relative to the capture directory).
Ingest checks the whole CSV first (unknown paths, unknown classes, duplicate rows, files that
are not supported images: each refused with its line number), then, per row: writes the image
into ``DATA/<split>/<label>/`` under its content hash (temp file, fsync, rename), appends
a provenance record to ``DATA/ingested.jsonl``, and only then deletes the capture and its JSON
sidecar. A crash at any point leaves either the capture or its copy, never half a file; a rerun
finishes the job, and an image already in the ledger is not added twice.

``--holdout-share F`` sends that share of the rows to ``DATA/holdout/<label>/`` instead: images
the trainer never trains on or picks an epoch with, which the export ships with the version
(``contracts.holdout_set``) so the rollout gate can compare versions where the model is used.
Which rows go is decided by the image's content hash, so it is the same on every rerun and
does not depend on the CSV's order. The classes are ``DATA/train``'s whatever the split.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from contracts.atomic_files import atomic_write_bytes, fsync_directory
from contracts.capture_files import InvalidCaptureSidecar, read_sidecar, sidecar_path
from contracts.holdout_set import HOLDOUT_DIRNAME
from contracts.image_formats import SUPPORTED_FORMATS, has_image_extension
from trainer.errors import DataError

LEDGER = "ingested.jsonl"
SPLITS = ("train", "val", HOLDOUT_DIRNAME)
# A labels file is written by a person's tool; anything larger is not a review of captures.
MAX_LABEL_ROWS = 1_000_000


@dataclass(frozen=True)
class LabelledCapture:
    """One CSV row, checked: the capture file, its class, where it came from."""

    line: int
    source: Path
    label: str


@dataclass(frozen=True)
class IngestReport:
    """What one ingest did."""

    added: dict[str, int]
    already_present: int
    conflicts: tuple[str, ...]
    # Of ``added``, how many went to ``DATA/holdout`` (``--holdout-share``), by label.
    held_out: dict[str, int] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        """One line for the terminal."""
        added = ", ".join(f"{label} {n}" for label, n in sorted(self.added.items())) or "none"
        held_out = f" ({sum(self.held_out.values())} of them to holdout/)" if self.held_out else ""
        return (
            f"added {sum(self.added.values())} image(s) ({added}){held_out}; "
            f"{self.already_present} already in the data; "
            f"{len(self.conflicts)} labelled differently before (kept as they were)"
        )


def read_labels(captures: Path, labels_csv: Path, known: set[str], allow_new: bool):
    """Parse and check every row before anything moves.

    Raises:
        DataError: listing each bad row by line number.
    """
    problems: list[str] = []
    rows: list[LabelledCapture] = []
    seen: dict[Path, int] = {}
    root = captures.resolve()
    try:
        with labels_csv.open(newline="", encoding="utf-8") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"labels file {labels_csv}: {error}") from None
    if len(lines) > MAX_LABEL_ROWS:
        raise DataError(f"labels file {labels_csv}: more than {MAX_LABEL_ROWS} rows")
    for number, fields in enumerate(lines, start=1):
        if number == 1 and [f.strip().lower() for f in fields] == ["path", "label"]:
            continue  # a header row
        if not fields or all(not f.strip() for f in fields):
            continue
        problem, row = _check_row(number, fields, root, known, allow_new)
        if row is not None and row.source in seen:
            problem = f"line {number}: duplicate of line {seen[row.source]}"
        if problem:
            problems.append(problem)
        elif row is not None:
            seen[row.source] = number
            rows.append(row)
    if problems:
        shown = "; ".join(problems[:20]) + ("; ..." if len(problems) > 20 else "")
        raise DataError(f"labels file {labels_csv}: {len(problems)} bad row(s): {shown}")
    return rows


def _check_row(
    number: int, fields: list[str], root: Path, known: set[str], allow_new: bool
) -> tuple[str | None, LabelledCapture | None]:
    if len(fields) != 2:
        return f"line {number}: expected 'path,label', got {len(fields)} field(s)", None
    relative, label = fields[0].strip(), fields[1].strip()
    source = (root / relative).resolve()
    if not source.is_relative_to(root):
        return f"line {number}: {relative!r} is outside the capture directory", None
    if not source.is_file():
        return f"line {number}: no capture {relative!r}", None
    if not has_image_extension(source.name) or not _is_readable_image(source):
        return f"line {number}: {relative!r} is not a readable JPEG, PNG, WebP or BMP", None
    if not label or label.startswith(".") or "/" in label or "\\" in label:
        return f"line {number}: {label!r} cannot be a class folder name", None
    if label not in known and not allow_new:
        return f"line {number}: unknown class {label!r} (--allow-new-classes adds it)", None
    return None, LabelledCapture(number, source, label)


def ingest(  # noqa: PLR0913  the inputs, then one keyword per choice
    captures: Path,
    labels_csv: Path,
    data: Path,
    *,
    split: str = "train",
    allow_new: bool = False,
    holdout_share: float = 0.0,
) -> IngestReport:
    """Move the labelled captures into ``data/split/<label>/`` (a ``holdout_share`` of them
    into ``data/holdout/<label>/``); see the module docstring."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if not 0.0 <= holdout_share <= 1.0:
        raise DataError(f"holdout share {holdout_share} must be between 0 and 1")
    train_dir = data / "train"
    if not train_dir.is_dir():
        raise DataError(f"data: {train_dir} is not a directory (an ImageFolder split)")
    if allow_new and split != "train":
        raise DataError("new classes can only be added to train/ (--split train)")
    if split == "val" and not (data / "val").is_dir():
        # A val/ holding only some classes would stop every later run: its classes must be
        # train's. Create it with every class folder first, or ingest into train.
        raise DataError(f"data: {data / 'val'} is not a directory (an ImageFolder split)")
    known = {p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    rows = read_labels(captures, labels_csv, known, allow_new)
    ledger = _read_ledger(data / LEDGER)
    added: Counter[str] = Counter()
    held_out: Counter[str] = Counter()
    present, conflicts = 0, []
    for row in rows:
        payload = row.source.read_bytes()
        digest = hashlib.sha256(payload).hexdigest()
        previous = ledger.get(digest)
        if previous is not None and previous != row.label:
            conflicts.append(f"line {row.line}: labelled {previous!r} before, {row.label!r} now")
        elif previous is not None:
            present += 1
        else:
            goes_to = HOLDOUT_DIRNAME if _share_of(digest) < holdout_share else split
            _add(data, data / goes_to, row, payload, digest)
            ledger[digest] = row.label
            added[row.label] += 1
            held_out[row.label] += goes_to == HOLDOUT_DIRNAME
        _remove_capture(row.source)
    return IngestReport(
        dict(added), present, tuple(conflicts), {k: n for k, n in held_out.items() if n}
    )


def _share_of(digest: str) -> float:
    """Where an image falls in [0, 1), from its content hash: the same on every rerun."""
    return int(digest[:8], 16) / 16**8


def _is_readable_image(path: Path) -> bool:
    try:
        with Image.open(path, formats=list(SUPPORTED_FORMATS)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
    return True


def _add(data: Path, split_dir: Path, row: LabelledCapture, payload: bytes, digest: str) -> None:
    target = split_dir / row.label / f"ingested-{digest[:20]}{row.source.suffix.lower()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, payload)
    record = {
        "sha256": digest,
        "label": row.label,
        "path": str(target.relative_to(data)),
        "source": row.source.name,
        "capture": _sidecar(row.source),
        "ingested_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # One short line per append: a crash leaves at most a torn last line, which the reader skips.
    with (data / LEDGER).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
    fsync_directory(data)


def _sidecar(source: Path) -> dict | None:
    """The capture's sidecar for the ledger; None when it has none or it cannot be read (the
    image is still the reviewed one: provenance is a record, not a condition)."""
    try:
        return read_sidecar(source).to_dict()
    except InvalidCaptureSidecar:
        return None


def _remove_capture(source: Path) -> None:
    sidecar_path(source).unlink(missing_ok=True)
    source.unlink(missing_ok=True)


def _read_ledger(path: Path) -> dict[str, str]:
    ledger: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return ledger
    for line in lines:
        try:
            record = json.loads(line)
            ledger[str(record["sha256"])] = str(record["label"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a crash
    return ledger


def add_parser(subparsers) -> None:
    """Register ``trainer ingest``."""
    parser = subparsers.add_parser(
        "ingest",
        help="move labelled production captures into the training set",
        description=(
            "Check a labels CSV (path,label; paths relative to --captures), then move each "
            "labelled capture into DATA/SPLIT/<label>/ under its content hash, atomically, "
            "recording provenance in DATA/ingested.jsonl. Rerunning it is safe."
        ),
    )
    parser.add_argument("--captures", type=Path, required=True, help="the capture directory")
    parser.add_argument(
        "--labels", type=Path, required=True, help="CSV of path,label rows (a header is allowed)"
    )
    parser.add_argument("--data", type=Path, required=True, help="the training ImageFolder root")
    parser.add_argument(
        "--split",
        default="train",
        choices=SPLITS,
        help="split folder to add to (default: %(default)s; val must exist already)",
    )
    parser.add_argument(
        "--holdout-share",
        type=float,
        default=0.0,
        help="share of the images (chosen by content hash, the same on every rerun) that go to "
        "DATA/holdout/<label>/ instead: never trained on, shipped with the exported version "
        "for the rollout gate (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-new-classes",
        action="store_true",
        help="create a class folder for a label the data does not have yet (default: refuse)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    report = ingest(
        args.captures,
        args.labels,
        args.data,
        split=args.split,
        allow_new=args.allow_new_classes,
        holdout_share=args.holdout_share,
    )
    print(report.describe())
    for conflict in report.conflicts:
        print(f"  {conflict}")
    return 0
