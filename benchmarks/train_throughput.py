"""Training throughput: the trainer's phase 1 and phase 2 against a tutorial-style loop.

Both sides train the same model (same initial weights) on the same generated images with the
same batch size, image size, optimizer (AdamW) and thread count:

- baseline: what the transfer-learning tutorials write: ``torchvision.datasets.ImageFolder``
  (PIL decode every epoch), ``transforms.Compose([RandomResizedCrop, RandomHorizontalFlip,
  ToTensor, Normalize])``, a ``DataLoader``, fp32 NCHW, ``model.train()`` on the whole model,
  ``requires_grad`` only on the head (phase 1) or on the top layer group and the head
  (phase 2), then ``loss.backward()`` and ``optimizer.step()``.
- trainer: its own input pipeline (``build_pipeline``: decoded once into a uint8 cache,
  transforms.v2 on uint8, per-batch normalisation), its phase setup (``set_trainable``,
  ``train_mode`` with frozen BatchNorm, ``build_optimizer``, ``build_scheduler``), its
  ``select_amp`` choice and memory-format default, and its ``train_one_epoch`` step code.

The two sides alternate step by step (who goes first alternates too), so load from other
processes on a shared machine hits both alike; each step is timed as "get the next batch" plus
"train on it", and the report splits the two.

It also reports the compute ceiling: training FLOPs per image (forward FLOPs counted with
``FlopCounterMode``, x 3 for a full forward + backward; and the FLOPs each phase really runs,
counted the same way) times images/s, against the machine's measured fp32 and bf16 matmul
FLOP/s.

    .venv/bin/python benchmarks/train_throughput.py

prints a table and writes ``bench-output/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

from trainer import phases
from trainer.augment import AugmentSettings, BatchPreparer
from trainer.classifier import create_model
from trainer.config import TrainConfig
from trainer.data import DatasetSplit, scan_dataset
from trainer.demo_data import DemoDataSpec, make_demo_data
from trainer.input_pipeline import Pipeline, build_pipeline
from trainer.layer_groups import LayerGroup, layer_groups
from trainer.loop import train_one_epoch
from trainer.process_setup import DistInfo, select_amp
from trainer.weights import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

TARGETS = {phases.HEAD_PHASE: 2.5, phases.FINETUNE_PHASE: 1.5}
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepTimes:
    """Per-step seconds spent getting the batch and training on it."""

    images: int = 0
    data_seconds: float = 0.0
    compute_seconds: float = 0.0
    per_step: list[float] = field(default_factory=list)

    def add(self, images: int, data_s: float, compute_s: float) -> None:
        self.images += images
        self.data_seconds += data_s
        self.compute_seconds += compute_s
        self.per_step.append((data_s + compute_s) / images)

    @property
    def images_per_second(self) -> float:
        return self.images / (self.data_seconds + self.compute_seconds)

    def summary(self) -> dict[str, float]:
        return {
            "images_per_second": round(self.images_per_second, 2),
            "data_ms_per_image": round(1e3 * self.data_seconds / self.images, 3),
            "compute_ms_per_image": round(1e3 * self.compute_seconds / self.images, 3),
        }


class Side:
    """One contestant: an endless batch stream (epoch after epoch) and a training step."""

    def __init__(
        self, new_epoch: Callable[[int], Iterator[Batch]], train_step: Callable[[Batch], None]
    ) -> None:
        self._new_epoch = new_epoch
        self._train_step = train_step
        self._epoch = 0
        self._batches = new_epoch(self._epoch)
        self.times = StepTimes()

    def step(self, record: bool) -> None:
        started = time.perf_counter()
        try:
            batch = next(self._batches)
        except StopIteration:
            self._epoch += 1
            self._batches = self._new_epoch(self._epoch)
            batch = next(self._batches)
        loaded = time.perf_counter()
        self._train_step(batch)
        done = time.perf_counter()
        if record:
            self.times.add(len(batch[1]), loaded - started, done - loaded)


# ---------------------------------------------------------------- the tutorial-style baseline


def tutorial_side(  # noqa: PLR0913  the tutorial loop's knobs, spelled out as the tutorial does
    model: nn.Module,
    root: Path,
    trainable_prefixes: tuple[str, ...],
    *,
    image_size: int,
    batch_size: int,
    num_workers: int,
    lr: float,
) -> Side:
    """The loop of the transfer-learning tutorials, for one phase."""
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.25, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    for name, param in model.named_parameters():
        param.requires_grad = _owned(name, trainable_prefixes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    criterion = nn.CrossEntropyLoss()
    model.train()

    def train_step(batch: Batch) -> None:
        inputs, labels = batch
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return Side(lambda _epoch: iter(loader), train_step)


def _owned(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ---------------------------------------------------------------- the trainer's own pipeline


def trainer_side(  # noqa: PLR0913  the trainer's parts, built by the caller as run.py builds them
    model: nn.Module,
    groups: list[LayerGroup],
    phase: phases.Phase,
    pipeline: Pipeline,
    config: TrainConfig,
    pre: Preprocessing,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> Side:
    """The trainer's phase setup and step code (``train_one_epoch`` on one batch at a time)."""
    device = torch.device("cpu")
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    trainable = phase.groups_at(1)
    phases.set_trainable(model, groups, trainable)
    optimizer = phases.build_optimizer(model, groups, trainable, phase.lrs, config.weight_decay)
    scheduler = phases.build_scheduler(optimizer, 10**6, config.warmup_fraction)
    prepare = BatchPreparer(pre, device, channels_last)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    phases.train_mode(model, groups, trainable, phase.freeze_bn)

    def new_epoch(epoch: int) -> Iterator[Batch]:
        pipeline.sampler.set_epoch(epoch)
        pipeline.sampler.set_start(0)
        return iter(pipeline.train_loader)

    def train_step(batch: Batch) -> None:
        train_one_epoch(
            model,
            [batch],
            optimizer=optimizer,
            scheduler=scheduler,
            prepare=prepare,
            loss_fn=loss_fn,
            device=device,
            amp_dtype=amp_dtype,
            scaler=None,
            grad_clip=config.grad_clip,
            mixer=None,
            ema=None,
            total=1,
            desc=phase.name,
            show_progress=False,
            should_stop=lambda: False,
        )

    return Side(new_epoch, train_step)


# ---------------------------------------------------------------- compute ceiling


def matmul_flops_per_second(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """Best-of-repeats FLOP/s of a square ``torch.matmul`` in ``dtype``."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def counted_flops_per_image(
    model: nn.Module, image_size: int, trainable_prefixes: tuple[str, ...] | None
) -> float:
    """FLOPs per image (a multiply-add counts 2) of a forward pass (``None``), or of a forward
    plus the backward autograd really runs when only ``trainable_prefixes`` train."""
    probe = copy.deepcopy(model)
    inputs = torch.randn(8, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    if trainable_prefixes is None:
        probe.eval()
        with counter, torch.no_grad():
            probe(inputs)
    else:
        for name, param in probe.named_parameters():
            param.requires_grad = _owned(name, trainable_prefixes)
        with counter:
            labels = torch.zeros(len(inputs), dtype=torch.long)
            nn.functional.cross_entropy(probe(inputs), labels).backward()
    return counter.get_total_flops() / len(inputs)


# ---------------------------------------------------------------- where the time goes


def frozen_forward_variants(
    model: nn.Module, image_size: int, batch_size: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Images/s of the frozen backbone's forward pass (phase 1's whole cost) done several
    ways, interleaved: what the trainer does against what it could do on this CPU."""
    inputs = torch.randn(batch_size, 3, image_size, image_size)
    inputs_cl = inputs.contiguous(memory_format=torch.channels_last)
    train_mode = copy.deepcopy(model).train()
    eval_nchw = copy.deepcopy(model).eval()
    eval_cl = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    folded = fx_fuse(copy.deepcopy(model).eval()).to(memory_format=torch.channels_last)
    folded_bf16 = copy.deepcopy(folded).to(torch.bfloat16)
    inputs_bf16 = inputs_cl.to(torch.bfloat16)

    def autocast(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
        def run() -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return module(x)

        return run

    variants: dict[str, Callable[[], Any]] = {
        "baseline: fp32 NCHW, BatchNorm in train mode": lambda: train_mode(inputs),
        "trainer default: autocast bf16, NCHW, BatchNorm eval": autocast(eval_nchw, inputs),
        "+ channels_last": autocast(eval_cl, inputs_cl),
        "+ BatchNorm folded into the convs": autocast(folded, inputs_cl),
        "+ bf16 weights cast once (no autocast)": lambda: folded_bf16(inputs_bf16),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for run in variants.values():
            run()
        for _ in range(rounds):
            for name, run in variants.items():
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
    baseline = statistics.median(next(iter(seconds.values())))
    return {
        name: {
            "images_per_second": round(batch_size / statistics.median(times), 1),
            "vs_baseline": round(baseline / statistics.median(times), 2),
        }
        for name, times in seconds.items()
    }


def data_item_costs(setup: Setup, count: int) -> dict[str, float]:
    """Microseconds per training image of each input pipeline, interleaved in chunks."""
    pipeline = trainer_pipeline(setup, 32, 0)
    cached = pipeline.train_loader.dataset
    tutorial = datasets.ImageFolder(
        str(setup.root / "train"),
        transform=transforms.Compose(
            [
                transforms.RandomResizedCrop(setup.pre.input_size[0], scale=(0.25, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        ),
    )
    size = min(len(tutorial), len(cached))  # type: ignore[arg-type]

    def reseed(index: int) -> None:
        # what CachedTrainSet does around every item's transform
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(index)

    items: dict[str, Callable[[int], Any]] = {
        "trainer: cached uint8 item (v2 transforms, per-item reseed)": lambda i: cached[(i, 1)],
        "  of which fork_rng + torch.manual_seed": reseed,
        "baseline: ImageFolder item (PIL decode + Compose)": lambda i: tutorial[i],
    }
    spent = {name: 0.0 for name in items}
    chunk = 25
    for start in range(0, count, chunk):
        for name, get in items.items():
            started = time.perf_counter()
            for i in range(start, start + chunk):
                get(i % size)
            spent[name] += time.perf_counter() - started
    total = (count + chunk - 1) // chunk * chunk
    return {name: round(1e6 * value / total, 1) for name, value in spent.items()}


# ---------------------------------------------------------------- driver

DEFAULT_SIDE = "trainer"
CHANNELS_LAST_SIDE = "trainer --channels-last"


@dataclass(frozen=True)
class Setup:
    """Everything both sides share."""

    root: Path
    split: DatasetSplit
    config: TrainConfig
    pre: Preprocessing
    model: nn.Module
    groups: list[LayerGroup]
    amp_dtype: torch.dtype | None


def trainer_pipeline(setup: Setup, batch_size: int, seed: int) -> Pipeline:
    """The trainer's own input pipeline with its default settings (one per side, so no two
    sides share a sampler)."""
    return build_pipeline(
        setup.split,
        pre=setup.pre,
        aug=AugmentSettings(),
        batch_size=batch_size,
        seed=seed,
        strict=setup.config.strict_data,
        cache_max_mb=setup.config.cache_max_mb,
        num_workers=setup.config.num_workers,
        info=DistInfo(0, 1, 0),
        device=torch.device("cpu"),
    )


def run_phase(phase: phases.Phase, setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Alternate the sides step by step; images/s, data/compute split and speedups."""
    trainable = phase.groups_at(1)
    prefixes = tuple(p for g in setup.groups if g.name in trainable for p in g.prefixes)
    # The trainer's default: channels_last only on CUDA (config.channels_last is None).
    default_channels_last = bool(setup.config.channels_last)
    sides = {
        "baseline": tutorial_side(
            copy.deepcopy(setup.model),
            setup.root,
            prefixes,
            image_size=args.image_size,
            batch_size=args.batch_size,
            num_workers=args.baseline_workers,
            lr=setup.config.head_lr,
        ),
        DEFAULT_SIDE: trainer_side(
            copy.deepcopy(setup.model),
            setup.groups,
            phase,
            trainer_pipeline(setup, args.batch_size, args.seed),
            setup.config,
            setup.pre,
            setup.amp_dtype,
            default_channels_last,
        ),
    }
    if not default_channels_last:
        sides[CHANNELS_LAST_SIDE] = trainer_side(
            copy.deepcopy(setup.model),
            setup.groups,
            phase,
            trainer_pipeline(setup, args.batch_size, args.seed),
            setup.config,
            setup.pre,
            setup.amp_dtype,
            True,
        )
    order = list(sides.values())
    for _ in range(args.warmup_steps):  # allocator, oneDNN primitive caches, page cache
        for side in order:
            side.step(record=False)
    for i in range(args.steps):
        for side in order[i % len(order) :] + order[: i % len(order)]:
            side.step(record=True)
    base = sides["baseline"].times
    result: dict[str, Any] = {
        "phase": phase.name,
        "trainable_groups": list(trainable),
        "target": TARGETS[phase.name],
        "executed_gflops_per_image": counted_flops_per_image(setup.model, args.image_size, prefixes)
        / 1e9,
        "sides": {},
    }
    for name, side in sides.items():
        entry: dict[str, Any] = side.times.summary()
        if name != "baseline":
            ratios = [b / m for b, m in zip(base.per_step, side.times.per_step, strict=True)]
            deciles = statistics.quantiles(ratios, n=10)
            entry["speedup"] = round(side.times.images_per_second / base.images_per_second, 3)
            entry["step_speedup_p10_p50_p90"] = [round(deciles[i], 2) for i in (0, 4, 8)]
        result["sides"][name] = entry
    result["speedup"] = result["sides"][DEFAULT_SIDE]["speedup"]
    result["meets_target"] = result["speedup"] >= result["target"]
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per side and phase")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument(
        "--baseline-workers",
        type=int,
        default=0,
        help="DataLoader workers of the baseline; 0 is its fastest setting on a 2-core machine "
        "(workers take the cores the model needs)",
    )
    parser.add_argument("--data", type=Path, help="ImageFolder root; default: generated data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench-output/train_throughput.json"))
    args = parser.parse_args(argv)
    if args.steps < 2 or args.batch_size < 2 or args.image_size < 16 or args.warmup_steps < 0:
        parser.error(
            "need --steps >= 2, --batch-size >= 2, --image-size >= 16, --warmup-steps >= 0"
        )
    if args.data is not None and not (args.data / "train").is_dir():
        parser.error(f"--data {args.data}: no train/ folder (expected DATA/train/<class>/*)")
    return args


def build_setup(root: Path, output: Path, args: argparse.Namespace) -> Setup:
    config = TrainConfig(
        data=root,
        output=output,
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    split = scan_dataset(root, val_fraction=config.val_fraction, seed=args.seed)
    # What preprocessing_for gives for weights without metadata at this crop size.
    pre = Preprocessing(
        (args.image_size, args.image_size),
        round(args.image_size / 0.875),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    model = create_model(args.arch, len(split.classes))
    amp_dtype, _ = select_amp(config.amp, torch.device("cpu"))
    return Setup(root, split, config, pre, model, layer_groups(model, args.arch), amp_dtype)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        root = args.data
        if root is None:
            spec = DemoDataSpec(
                seed=args.seed,
                image_size=args.image_size,
                source_train_per_class=64,
                target_train_per_class=2,
                val_per_class=4,
            )
            make_demo_data(Path(tmp) / "demo", spec)
            root = Path(tmp) / "demo" / "source"
        setup = build_setup(root, Path(tmp) / "out", args)
        run_phases = phases.build_phases(
            [g.name for g in setup.groups],
            head_epochs=1,
            finetune_epochs=1,
            policy="top:1",
            lr=1e-4,
            head_lr=setup.config.head_lr,
            lr_decay=0.3,
            freeze_bn=setup.config.freeze_bn,
        )
        results = []
        for phase in run_phases:
            print(f"measuring {phase.name} ...", file=sys.stderr, flush=True)
            results.append(run_phase(phase, setup, args))
        forward = counted_flops_per_image(setup.model, args.image_size, None)
        print("measuring where the time goes ...", file=sys.stderr, flush=True)
        variants = frozen_forward_variants(setup.model, args.image_size, args.batch_size, 12)
        data_costs = data_item_costs(setup, 200)
    peaks = {
        "fp32": matmul_flops_per_second(torch.float32),
        "bf16": matmul_flops_per_second(torch.bfloat16),
    }
    amp = setup.amp_dtype
    report = {
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "train_images": len(setup.split.train),
        "baseline_workers": args.baseline_workers,
        "trainer_amp": str(amp).removeprefix("torch.") if amp else "off (fp32)",
        "threads": torch.get_num_threads(),
        "forward_gflops_per_image": forward / 1e9,
        "full_training_gflops_per_image": 3 * forward / 1e9,
        "matmul_gflops_per_second": {k: v / 1e9 for k, v in peaks.items()},
        "phases": results,
        "frozen_backbone_forward": variants,
        "data_us_per_image": data_costs,
        "gpu_resnet50_224": "no GPU lent",
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(format_table(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = args.output.with_name(args.output.name + ".tmp")
    tmp_path.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_path, args.output)
    print(f"wrote {args.output}")
    return 0


def format_table(report: dict[str, Any]) -> str:
    """The Markdown tables (throughput, compute ceiling) of ``report``."""
    peak = report["matmul_gflops_per_second"]
    full = report["full_training_gflops_per_image"]
    lines = [
        f"{report['arch']} at {report['image_size']} px, batch {report['batch_size']}, "
        f"{report['threads']} threads, {report['steps']} interleaved steps per side and phase, "
        f"trainer amp {report['trainer_amp']}, "
        f"load average {report['machine']['load_average_1_5_15']}",
        "",
        "| phase | side | img/s | data ms/img | compute ms/img | speedup (p10-p90 of steps) "
        "| target |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in report["phases"]:
        verdict = "met" if row["meets_target"] else "**missed**"
        for name, side in row["sides"].items():
            ratio = target = ""
            if "speedup" in side:
                p10, _, p90 = side["step_speedup_p10_p50_p90"]
                ratio = f"{side['speedup']:.2f}x ({p10:.2f}-{p90:.2f})"
            if name == DEFAULT_SIDE:
                target = f">= {row['target']}x: {verdict}"
            lines.append(
                f"| {row['phase']} ({'+'.join(row['trainable_groups'])}) | {name} | "
                f"{side['images_per_second']:.1f} | {side['data_ms_per_image']:.2f} | "
                f"{side['compute_ms_per_image']:.2f} | {ratio} | {target} |"
            )
    lines += [
        "",
        "| compute ceiling (trainer default) | GFLOP/image | GFLOP/s at its img/s "
        "| of bf16 matmul | of fp32 matmul |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["phases"]:
        ips = row["sides"][DEFAULT_SIDE]["images_per_second"]
        for label, gflop in (
            (f"{row['phase']}: full training, 3 x forward", full),
            (f"{row['phase']}: executed (counted)", row["executed_gflops_per_image"]),
        ):
            rate = gflop * ips
            lines.append(
                f"| {label} | {gflop:.3f} | {rate:.1f} | {rate / peak['bf16']:.0%} | "
                f"{rate / peak['fp32']:.0%} |"
            )
    lines += [
        "",
        "| frozen backbone forward (phase 1 compute) | img/s | vs baseline |",
        "|---|---:|---:|",
    ]
    for name, numbers in report["frozen_backbone_forward"].items():
        lines.append(
            f"| {name} | {numbers['images_per_second']:.1f} | {numbers['vs_baseline']:.2f}x |"
        )
    lines += ["", "| input pipeline, per training image | us |", "|---|---:|"]
    for name, micros in report["data_us_per_image"].items():
        lines.append(f"| {name} | {micros:.0f} |")
    lines += [
        "",
        f"forward {report['forward_gflops_per_image']:.3f} GFLOP/image; matmul 2048x2048: "
        f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; "
        f"ResNet-50 224 px on GPU: {report['gpu_resnet50_224']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
