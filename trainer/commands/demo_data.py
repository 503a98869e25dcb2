"""Embedded demo data: two small, seeded, procedurally generated image-classification tasks.

No pretrained weights or datasets can be downloaded where the demo runs, so the demo shows
transfer learning with a stand-in: a model trained from scratch on the *source* task (plain
geometric shapes) is fine-tuned on a different *target* task (composite shapes) that has far
fewer training images. Every image has a random textured, noisy background and a shape of
random position, scale, rotation and colour, so neither task can be solved from mean colour.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from trainer.errors import UsageError


@dataclass(frozen=True)
class Placement:
    """Where a shape is drawn: centred at (cx, cy), radius r, rotated by angle (radians)."""

    cx: float
    cy: float
    r: float
    angle: float


# Draws one shape on the image at a placement, in a colour.
ShapeDrawer = Callable[[Image.Image, Placement, tuple[int, ...]], None]

#: File formats cycled through so every decoder path the trainer supports gets exercised.
FORMATS = ("jpg", "png", "webp", "bmp")
MARKER = ".demo-data.json"


@dataclass(frozen=True)
class DemoDataSpec:
    """What to generate; written beside the data so a re-run can tell it is already there."""

    seed: int = 0
    image_size: int = 64
    source_train_per_class: int = 240
    target_train_per_class: int = 40
    val_per_class: int = 30


def _rotated(points: list[tuple[float, float]], at: Placement) -> list[tuple[float, float]]:
    cx, cy, r = at.cx, at.cy, at.r
    cos, sin = math.cos(at.angle), math.sin(at.angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def _regular_polygon(sides: int, inner: float | None = None) -> list[tuple[float, float]]:
    """Unit polygon; with `inner`, a star whose inner vertices sit at that radius."""
    if inner is None:
        return [
            (math.cos(2 * math.pi * k / sides), math.sin(2 * math.pi * k / sides))
            for k in range(sides)
        ]
    points = []
    for k in range(2 * sides):
        radius = 1.0 if k % 2 == 0 else inner
        theta = math.pi * k / sides
        points.append((radius * math.cos(theta), radius * math.sin(theta)))
    return points


def _polygon(unit: list[tuple[float, float]]) -> ShapeDrawer:
    def draw(image: Image.Image, at: Placement, colour: tuple[int, ...]) -> None:
        ImageDraw.Draw(image).polygon(_rotated(unit, at), fill=colour)

    return draw


def _circle(image: Image.Image, at: Placement, colour: tuple[int, ...]) -> None:
    cx, cy, r = at.cx, at.cy, at.r
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)


def _ring(image: Image.Image, at: Placement, colour: tuple[int, ...]) -> None:
    cx, cy, r = at.cx, at.cy, at.r
    ImageDraw.Draw(image).ellipse(
        (cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, int(r / 3))
    )


def _crescent(image: Image.Image, at: Placement, colour: tuple[int, ...]) -> None:
    # Drawn as a mask so the "bite" shows the background, not a flat colour.
    cx, cy, r, angle = at.cx, at.cy, at.r, at.angle
    size = int(4 * r) + 4
    mask = Image.new("L", (size, size), 0)
    m = ImageDraw.Draw(mask)
    c = size / 2
    m.ellipse((c - r, c - r, c + r, c + r), fill=255)
    dx, dy = 0.55 * r * math.cos(angle), 0.55 * r * math.sin(angle)
    m.ellipse((c + dx - 0.85 * r, c + dy - 0.85 * r, c + dx + 0.85 * r, c + dy + 0.85 * r), fill=0)
    image.paste(colour, (int(cx - c), int(cy - c)), mask)


_ARROW = [
    (-1.0, -0.25),
    (0.2, -0.25),
    (0.2, -0.6),
    (1.0, 0.0),
    (0.2, 0.6),
    (0.2, 0.25),
    (-1.0, 0.25),
]
_CROSS = [
    (-0.3, -1.0), (0.3, -1.0), (0.3, -0.3), (1.0, -0.3), (1.0, 0.3), (0.3, 0.3),
    (0.3, 1.0), (-0.3, 1.0), (-0.3, 0.3), (-1.0, 0.3), (-1.0, -0.3), (-0.3, -0.3),
]  # fmt: skip
_L_SHAPE = [(-0.8, -1.0), (-0.2, -1.0), (-0.2, 0.4), (0.8, 0.4), (0.8, 1.0), (-0.8, 1.0)]

SOURCE_CLASSES: dict[str, ShapeDrawer] = {
    "circle": _circle,
    "cross": _polygon(_CROSS),
    "square": _polygon(_regular_polygon(4)),
    "star": _polygon(_regular_polygon(5, inner=0.42)),
    "triangle": _polygon(_regular_polygon(3)),
}
TARGET_CLASSES: dict[str, ShapeDrawer] = {
    "arrow": _polygon(_ARROW),
    "crescent": _crescent,
    "l-shape": _polygon(_L_SHAPE),
    "ring": _ring,
}


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random two-colour gradient with stripes, blobs and pixel noise."""
    a, b = rng.integers(0, 256, size=(2, 3))
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = (np.cos(theta) * xx + np.sin(theta) * yy + 1) / 2
    pixels = a * (1 - t[..., None]) + b * t[..., None]
    stripe_freq = rng.uniform(2, 9)
    stripes = np.sin(2 * math.pi * stripe_freq * (xx * np.sin(theta) - yy * np.cos(theta)))
    pixels += rng.uniform(5, 20) * stripes[..., None]
    pixels += rng.normal(0, rng.uniform(3, 10), size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    # Small distractor blobs, clearly smaller than any shape, so "circle" stays well defined.
    for _ in range(int(rng.integers(0, 4))):
        x, y, rr = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 24, size / 12)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))


def render_image(rng: np.random.Generator, drawer: ShapeDrawer, size: int) -> Image.Image:
    """One example: a randomly placed, scaled, rotated and coloured shape over a background."""
    image = _background(rng, size)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
    drawer(image, Placement(cx, cy, r, rng.uniform(0, 2 * math.pi)), colour)
    noise = rng.normal(0, 4, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8), "RGB")


def _write_task(
    root: Path, classes: dict[str, ShapeDrawer], counts: dict[str, int], seed: int, size: int
) -> None:
    for split_index, (split, per_class) in enumerate(counts.items()):
        for class_index, (name, drawer) in enumerate(sorted(classes.items())):
            rng = np.random.default_rng([seed, split_index, class_index])
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                fmt = FORMATS[i % len(FORMATS)]
                image = render_image(rng, drawer, size)
                image.save(folder / f"{name}-{i:04d}.{fmt}", quality=92)


def make_demo_data(output_dir: Path, spec: DemoDataSpec = DemoDataSpec()) -> bool:
    """Write `source/` and `target/` ImageFolder trees (each with `train/` and `val/`).

    The trees are built in a temporary sibling directory and renamed into place, so an
    interrupted run leaves nothing half-written. Returns False when `output_dir` already holds
    demo data made with the same spec (nothing is written), True when it wrote it.

    Raises:
        UsageError: `output_dir` exists and holds something other than this demo data.
    """
    output_dir = Path(output_dir)
    marker = output_dir / MARKER
    if output_dir.exists():
        if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
            return False
        if any(output_dir.iterdir()):
            raise UsageError(
                f"{output_dir} exists and is not empty; demo data is only written to a new or "
                "empty directory (or one made earlier with the same options)"
            )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        val = spec.val_per_class
        source = {"train": spec.source_train_per_class, "val": val}
        target = {"train": spec.target_train_per_class, "val": val}
        _write_task(staging / "source", SOURCE_CLASSES, source, spec.seed, spec.image_size)
        _write_task(staging / "target", TARGET_CLASSES, target, spec.seed + 1, spec.image_size)
        (staging / MARKER).write_text(json.dumps(asdict(spec), indent=2) + "\n")
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked above
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(subparsers) -> None:
    """Register `trainer make-demo-data`."""
    defaults = DemoDataSpec()
    parser = subparsers.add_parser(
        "make-demo-data",
        help="write the embedded demo datasets (a source and a target task)",
        description=(
            "Write two seeded, procedurally generated ImageFolder datasets under OUTPUT_DIR: "
            f"source/ ({', '.join(sorted(SOURCE_CLASSES))}) and target/ "
            f"({', '.join(sorted(TARGET_CLASSES))}), each with train/ and val/ splits. "
            "Running it again with the same options is a no-op."
        ),
    )
    parser.add_argument(
        "output_dir", type=Path, metavar="OUTPUT_DIR", help="directory to write source/ and target/"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the generator (default: %(default)s)",
    )
    parser.add_argument(
        "--image-size",
        type=_positive,
        default=defaults.image_size,
        help="side of the square images in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--source-train-per-class",
        type=_positive,
        default=defaults.source_train_per_class,
        help="training images per class of the source task (default: %(default)s)",
    )
    parser.add_argument(
        "--target-train-per-class",
        type=_positive,
        default=defaults.target_train_per_class,
        help="training images per class of the target task (default: %(default)s)",
    )
    parser.add_argument(
        "--val-per-class",
        type=_positive,
        default=defaults.val_per_class,
        help="validation images per class of both tasks (default: %(default)s)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    spec = DemoDataSpec(
        seed=args.seed,
        image_size=args.image_size,
        source_train_per_class=args.source_train_per_class,
        target_train_per_class=args.target_train_per_class,
        val_per_class=args.val_per_class,
    )
    wrote = make_demo_data(args.output_dir, spec)
    state = "wrote" if wrote else "already present:"
    print(f"{state} demo data in {args.output_dir} (source/ and target/, train/ and val/)")
    return 0
