"""Training throughput: the trainer's head phase and phase 2 against a tutorial-style loop.

Both sides train the same model (same initial weights) on the same generated images with the
same batch size, image size and thread count:

- baseline: what the transfer-learning tutorials write: ``torchvision.datasets.ImageFolder``
  (PIL decode every epoch), ``transforms.Compose([RandomResizedCrop, RandomHorizontalFlip,
  ToTensor, Normalize])``, a ``DataLoader``, fp32 NCHW, ``model.train()`` on the whole model,
  ``requires_grad`` only on the head (phase 1) or on the top layer group and the head
  (phase 2), AdamW, ``loss.backward()``, ``optimizer.step()``.
- trainer, phase 1 (``head``): the whole head phase as ``trainer train`` runs it by default,
  ``trainer.head.stage.run_head_stage``: the frozen backbone's features of ``--feature-views``
  views of every training image and of the val images (plain and under the three candidate
  transforms), written to the feature cache, then the linear probe, the augmentation decisions
  and the head fitted on the cache. Against it: the tutorial loop running as many epochs of
  frozen-backbone training as the trainer's default ``--head-epochs``. The two alternate round
  by round (who goes first alternates too), each round a fresh cache.
- trainer, phase 2 (``finetune``, the top layer group and the head): its input pipeline
  (``build_pipeline``: decoded once into a uint8 cache, transforms.v2 on uint8, per-batch
  normalisation), its phase setup (``set_trainable``, ``train_mode``, ``build_optimizer``,
  ``build_scheduler``), the training view the phase runner trains through
  (``trainer.finetune.frozen_prefix.training_view``: the frozen prefix folded, without autograd,
  channels_last on CPU), its ``select_amp`` choice and its ``train_one_epoch`` step code. Beside
  it, for the evidence: the same with ``--amp off``, with the plain model (no view: the path
  before the view existed) and with ``--channels-last`` (the whole model). The sides alternate
  step by step (who goes first rotates), so load from other processes hits all alike; each step
  is timed as "get the next batch" plus "train on it", and the report splits the two.
- phase 1 streamed (when the feature cache would exceed ``--feature-cache-mb``): the same
  per-step comparison with only the head trainable.

Then where the time goes: the phase-2 step of each side cut into its parts, the frozen
prefix's forward done several ways, the input pipeline per image, and the compute ceiling
(FLOPs counted with ``FlopCounterMode`` against the machine's measured matmul FLOP/s).

    .venv/bin/python benchmarks/train_throughput.py

prints the tables and writes ``bench-output/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

from contracts.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from trainer.augment_defaults import CANDIDATES
from trainer.commands.demo_data import DemoDataSpec, make_demo_data
from trainer.config import TrainConfig, resolve_defaults
from trainer.data.augment import AugmentSettings, BatchPreparer, augment_settings
from trainer.data.folders import DatasetSplit, scan_dataset
from trainer.data.input_pipeline import LoaderSettings, Pipeline, build_pipeline
from trainer.finetune import phases
from trainer.finetune.frozen_prefix import FrozenPrefixView, forward_stages, training_view
from trainer.finetune.loop import (
    EpochControl,
    StepSetup,
    WeightUpdate,
    autocast,
    train_one_epoch,
)
from trainer.head import feature_cache as fc
from trainer.head.fit import fit_head, fit_probe
from trainer.head.linear_probe import LabelledFeatures
from trainer.head.stage import FeatureSettings, run_head_stage
from trainer.job.process_setup import DistInfo, configure_threads, select_amp
from trainer.model.classifier import create_model, head_module_name
from trainer.model.layer_groups import LayerGroup, layer_groups

TARGETS = {"head phase": 5.0, phases.FINETUNE_PHASE: 2.0}
STREAMED = "head (streamed fallback)"
Batch = tuple[torch.Tensor, torch.Tensor]
CPU = torch.device("cpu")


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


def tutorial_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.25, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


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
    dataset = datasets.ImageFolder(str(root / "train"), transform=tutorial_transform(image_size))
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


# ---------------------------------------------------------------- the trainer's own path


@dataclass(frozen=True)
class TrainerVariant:
    """How a trainer side differs from the trainer's defaults (for the evidence rows)."""

    view: bool = True
    amp: bool = True
    channels_last: bool | None = None  # None: the config's resolved default


def trainer_step_parts(
    model: nn.Module, setup: Setup, phase: phases.Phase, variant: TrainerVariant
) -> tuple[nn.Module, torch.optim.Optimizer, Any, BatchPreparer, nn.Module]:
    """What the phase runner builds at phase entry: the module it trains through (``_wrap``
    without DDP and compile), the optimizer, the schedule, the batch preparer, the loss."""
    config = setup.config
    channels_last = (
        bool(config.channels_last) if variant.channels_last is None else variant.channels_last
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    trainable = phase.groups_at(1)
    phases.set_trainable(model, setup.groups, trainable)
    optimizer = phases.build_optimizer(
        model, setup.groups, trainable, phase.lrs, config.weight_decay
    )
    scheduler = phases.build_scheduler(optimizer, 10**6, config.warmup_fraction)
    wrapped = (
        training_view(model, config.arch, setup.groups, channels_last=channels_last)
        if variant.view
        else model
    )
    phases.train_mode(model, setup.groups, trainable, phase.freeze_bn)
    prepare = BatchPreparer(setup.pre, CPU, channels_last)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return wrapped, optimizer, scheduler, prepare, loss_fn


def trainer_side(
    model: nn.Module, setup: Setup, phase: phases.Phase, variant: TrainerVariant, seed: int
) -> Side:
    """The trainer's phase setup and step code (``train_one_epoch`` on one batch at a time)."""
    wrapped, optimizer, scheduler, prepare, loss_fn = trainer_step_parts(
        model, setup, phase, variant
    )
    pipeline = trainer_pipeline(setup, seed)
    amp_dtype = setup.amp_dtype if variant.amp else None

    def new_epoch(epoch: int) -> Iterator[Batch]:
        pipeline.sampler.set_epoch(epoch)
        pipeline.sampler.set_start(0)
        return iter(pipeline.train_loader)

    step = StepSetup(
        device=CPU, prepare=prepare, mixer=None, amp_dtype=amp_dtype, scaler=None, loss_fn=loss_fn
    )
    update = WeightUpdate(optimizer, scheduler, setup.config.grad_clip)
    control = EpochControl(total=1, desc=phase.name, show_progress=False)

    def train_step(batch: Batch) -> None:
        train_one_epoch(wrapped, [batch], step, update, control)

    return Side(new_epoch, train_step)


def trainer_pipeline(setup: Setup, seed: int) -> Pipeline:
    """The trainer's own input pipeline with its default settings (one per side, so no two
    sides share a sampler)."""
    return build_pipeline(
        setup.split,
        pre=setup.pre,
        aug=AugmentSettings(),
        loading=LoaderSettings(
            batch_size=setup.config.batch_size,
            seed=seed,
            strict=setup.config.strict_data,
            cache_max_mb=setup.config.cache_max_mb,
            num_workers=setup.config.num_workers,
            pin_memory=False,
        ),
        info=DistInfo(0, 1, 0),
    )


# ---------------------------------------------------------------- phase 2 (and streamed phase 1)


DEFAULT_SIDE = "trainer"
SIDE_VARIANTS = {
    DEFAULT_SIDE: TrainerVariant(),
    "trainer --amp off": TrainerVariant(amp=False),
    "trainer, plain model (no view)": TrainerVariant(view=False),
    "trainer --channels-last (whole model)": TrainerVariant(channels_last=True),
}


def run_steps(
    name: str, phase: phases.Phase, setup: Setup, args: argparse.Namespace, evidence: bool
) -> dict[str, Any]:
    """Alternate the sides step by step; images/s, data/compute split and speedups."""
    trainable = phase.groups_at(1)
    prefixes = tuple(p for g in setup.groups if g.name in trainable for p in g.prefixes)
    sides = {
        "baseline": tutorial_side(
            copy.deepcopy(setup.model),
            setup.root,
            prefixes,
            image_size=args.image_size,
            batch_size=args.batch_size,
            num_workers=args.baseline_workers,
            lr=setup.config.head_lr,
        )
    }
    for label, variant in SIDE_VARIANTS.items():
        if label == DEFAULT_SIDE or evidence:
            model = copy.deepcopy(setup.model)
            sides[label] = trainer_side(model, setup, phase, variant, args.seed)
    order = list(sides.values())
    for _ in range(args.warmup_steps):  # allocator, oneDNN primitive caches, page cache
        for side in order:
            side.step(record=False)
    for i in range(args.steps):
        for side in order[i % len(order) :] + order[: i % len(order)]:
            side.step(record=True)
    base = sides["baseline"].times
    result: dict[str, Any] = {
        "phase": name,
        "trainable_groups": list(trainable),
        "target": TARGETS.get(name),
        "executed_gflops_per_image": counted_flops_per_image(setup.model, args.image_size, prefixes)
        / 1e9,
        "sides": {},
    }
    for label, side in sides.items():
        entry: dict[str, Any] = side.times.summary()
        if label != "baseline":
            ratios = [b / m for b, m in zip(base.per_step, side.times.per_step, strict=True)]
            deciles = statistics.quantiles(ratios, n=10)
            entry["speedup"] = round(side.times.images_per_second / base.images_per_second, 3)
            entry["step_speedup_p10_p50_p90"] = [round(deciles[i], 2) for i in (0, 4, 8)]
        result["sides"][label] = entry
    result["speedup"] = result["sides"][DEFAULT_SIDE]["speedup"]
    if result["target"] is not None:
        result["meets_target"] = result["speedup"] >= result["target"]
    return result


# ---------------------------------------------------------------- phase 1: the whole head phase


def head_stage_once(setup: Setup, output: Path) -> tuple[float, dict[str, Any]]:
    """``run_head_stage`` as ``trainer.stages.head_and_choice`` calls it with the defaults (a
    fresh cache in ``output``): its wall seconds and what it reported."""
    config = setup.config
    model = copy.deepcopy(setup.model)
    pipeline = trainer_pipeline(setup, config.seed)  # decoded once, shared by both phases
    aug = augment_settings(config.to_dict())
    settings = FeatureSettings(
        views=config.feature_views,
        cache_mb=config.feature_cache_mb,
        batch_size=config.batch_size,
        output=output,
        fingerprint_parts={"benchmark": True, "augment": dataclasses.asdict(aug)},
    )
    started = time.perf_counter()
    result = run_head_stage(
        model,
        head_module_name(model),
        pipeline,
        pre=setup.pre,
        prepare=BatchPreparer(setup.pre, CPU, bool(config.channels_last)),
        settings=settings,
        info=DistInfo(0, 1, 0),
        fit_the_head=True,
        user_flags={name: getattr(config, name) for name in CANDIDATES},
        num_classes=len(setup.split.classes),
        class_weights=None,
        label_smoothing=config.label_smoothing,
    )
    seconds = time.perf_counter() - started
    fit = result.head_fit
    facts: dict[str, Any] = fit.to_dict() if fit is not None else {"fallback": result.fallback}
    facts["backbone_images"] = (
        fit.train_rows + 4 * pipeline.val_images if fit is not None else None
    )  # every val image plain and under the three candidate transforms
    facts["fit_seconds"] = round(_fit_seconds(model, output, setup, config.label_smoothing), 2)
    return seconds, facts


def _fit_seconds(model: nn.Module, output: Path, setup: Setup, label_smoothing: float) -> float:
    """Seconds of the head stage's fitting alone (probe + head), redone on the cache it wrote."""
    document = torch.load(output / fc.CACHE_FILE, weights_only=True)
    train = LabelledFeatures(document["train_features"], document["train_labels"])
    val = LabelledFeatures(document["val_features"], document["val_labels"])
    head = copy.deepcopy(model.get_submodule(head_module_name(model)))
    classes = len(setup.split.classes)
    started = time.perf_counter()
    probe = fit_probe(train, val, classes, None)
    fit_head(
        head,
        probe,
        train,
        val,
        num_classes=classes,
        class_weights=None,
        views=int(document["views"]),
        cache="built",
        started=started,
        label_smoothing=label_smoothing,
    )
    return time.perf_counter() - started


def run_head_phase(setup: Setup, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Rounds of (tutorial: head_epochs epochs | trainer: the head stage), order alternating."""
    head_epochs = int(setup.config.head_epochs or 0)
    prefixes = tuple(p for g in setup.groups if g.name == phases.HEAD for p in g.prefixes)
    tutorial = tutorial_side(
        copy.deepcopy(setup.model),
        setup.root,
        prefixes,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.baseline_workers,
        lr=setup.config.head_lr,
    )
    steps_per_epoch = -(-len(setup.split.train) // args.batch_size)
    for _ in range(args.warmup_steps):
        tutorial.step(record=False)
    head_stage_once(setup, tmp / "warmup")  # oneDNN primitives, allocator, page cache
    rounds = []
    for r in range(args.head_rounds):
        timings: dict[str, float] = {}
        facts: dict[str, Any] = {}
        for who in ("baseline", "trainer") if r % 2 == 0 else ("trainer", "baseline"):
            if who == "baseline":
                started = time.perf_counter()
                for _ in range(head_epochs * steps_per_epoch):
                    tutorial.step(record=False)
                timings[who] = time.perf_counter() - started
            else:
                timings[who], facts = head_stage_once(setup, tmp / f"round{r}")
        rounds.append(timings | {"speedup": timings["baseline"] / timings["trainer"]})
    baseline = statistics.median(r["baseline"] for r in rounds)
    trainer = statistics.median(r["trainer"] for r in rounds)
    speedup = statistics.median(r["speedup"] for r in rounds)
    return {
        "head_epochs": head_epochs,
        "feature_views": setup.config.feature_views,
        "baseline_seconds": round(baseline, 2),
        "trainer_seconds": round(trainer, 2),
        "speedup": round(speedup, 3),
        "round_speedups": [round(r["speedup"], 2) for r in rounds],
        "target": TARGETS["head phase"],
        "meets_target": speedup >= TARGETS["head phase"],
        "tutorial_seconds_per_epoch": round(baseline / max(1, head_epochs), 2),
        "head_epochs_for_target": round(TARGETS["head phase"] * trainer / baseline * head_epochs, 1)
        if head_epochs
        else None,
        "head_stage": facts,
    }


def extraction_paths(setup: Setup, batch: torch.Tensor, rounds: int) -> dict[str, float]:
    """Images/s of the frozen backbone's forward as the feature cache runs it (the plain model,
    fp32, eval) against the same through the training view (folded prefix, bf16 autocast,
    channels_last on CPU): what extraction could cost, interleaved."""
    plain = copy.deepcopy(setup.model).eval()
    viewed = copy.deepcopy(setup.model)
    phases.set_trainable(viewed, setup.groups, (phases.HEAD,))
    view = training_view(viewed, setup.config.arch, setup.groups)
    viewed.eval()
    view.eval()
    prepare = BatchPreparer(setup.pre, CPU, bool(setup.config.channels_last))
    inputs = prepare(batch)

    def through_view() -> None:
        with autocast(CPU, setup.amp_dtype):
            view(inputs)

    paths: dict[str, Callable[[], Any]] = {
        "feature cache as run (plain model, fp32, eval)": lambda: plain(inputs),
        "through the training view (folded, bf16, channels_last)": through_view,
    }
    return _interleaved_rates(paths, len(batch), rounds)


def _interleaved_rates(
    runs: dict[str, Callable[[], Any]], images: int, rounds: int
) -> dict[str, float]:
    return {
        name: round(images / seconds, 1)
        for name, seconds in _interleaved_seconds(runs, rounds).items()
    }


def _interleaved_seconds(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each run without autograd, the runs taking turns (the first rotates)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    with torch.no_grad():
        for run in runs.values():
            run()
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                started = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


# ---------------------------------------------------------------- where the time goes


def finetune_step_parts(
    setup: Setup, phase: phases.Phase, batch: Batch, rounds: int
) -> dict[str, dict[str, float]]:
    """Milliseconds of each part of one phase-2 step on the same batch, baseline against the
    trainer's default path, interleaved: the forward of the frozen part, the forward and
    backward of the trainable part, the optimizer step (with the trainer's gradient clipping)."""
    trainable = phase.groups_at(1)
    prefixes = tuple(p for g in setup.groups if g.name in trainable for p in g.prefixes)
    images, labels = batch
    base_model = copy.deepcopy(setup.model)
    for name, param in base_model.named_parameters():
        param.requires_grad = _owned(name, prefixes)
    base_model.train()
    base_optimizer = torch.optim.AdamW([p for p in base_model.parameters() if p.requires_grad])
    base_inputs = BatchPreparer(setup.pre, CPU, channels_last=False)(images)
    model = copy.deepcopy(setup.model)
    wrapped, optimizer, _, prepare, loss_fn = trainer_step_parts(
        model, setup, phase, TrainerVariant()
    )
    inputs = prepare(images)
    assert isinstance(wrapped, FrozenPrefixView)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    features: dict[str, torch.Tensor] = {}

    def base_total() -> None:
        loss = nn.functional.cross_entropy(base_model(base_inputs), labels)
        base_optimizer.zero_grad()
        loss.backward()
        base_optimizer.step()

    def prefix() -> None:
        with torch.no_grad(), autocast(CPU, setup.amp_dtype):
            out = wrapped.prefix(inputs.contiguous(memory_format=wrapped.prefix_format))
        features["x"] = out.contiguous(memory_format=wrapped.suffix_format)

    def suffix() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(CPU, setup.amp_dtype):
            loss = loss_fn(wrapped.suffix(features["x"]).float(), labels)
        loss.backward()

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, setup.config.grad_clip)
        optimizer.step()

    parts = {
        "baseline: whole step": base_total,
        "trainer: frozen prefix forward": prefix,
        "trainer: trainable part forward + backward": suffix,
        "trainer: clip + fused AdamW": step,
    }
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for run in parts.values():
        run()
    for _ in range(rounds):
        for name, run in parts.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: {"ms": round(1e3 * statistics.median(s), 1)} for name, s in seconds.items()}


def prefix_forward_variants(
    setup: Setup, trainable: tuple[str, ...], rounds: int
) -> dict[str, dict[str, float]]:
    """Images/s of phase 2's frozen part, forward only, done several ways, interleaved."""
    batch = torch.randn(setup.config.batch_size, 3, *setup.pre.input_size)
    model = copy.deepcopy(setup.model)
    phases.set_trainable(model, setup.groups, trainable)
    view = training_view(model, setup.config.arch, setup.groups)
    assert isinstance(view, FrozenPrefixView)
    base_prefix = _plain_prefix(setup, trainable).train()
    old_prefix = _plain_prefix(setup, trainable).eval()
    nchw = copy.deepcopy(view.prefix).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    channels_last = batch.contiguous(memory_format=torch.channels_last)
    amp = setup.amp_dtype

    def bf16(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
        def run() -> Any:
            with autocast(CPU, amp):
                return module(x)

        return run

    runs: dict[str, Callable[[], Any]] = {
        "baseline: fp32 NCHW, BatchNorm in train mode": lambda: base_prefix(batch),
        "trainer before: autocast bf16, NCHW, BatchNorm eval": bf16(old_prefix, batch),
        "+ BatchNorm folded": bf16(nchw, batch),
        "+ channels_last (trainer default)": bf16(view.prefix, channels_last),
    }
    seconds = _interleaved_seconds(runs, rounds)
    baseline = next(iter(seconds.values()))
    return {
        name: {
            "images_per_second": round(len(batch) / median, 1),
            "vs_baseline": round(baseline / median, 2),
        }
        for name, median in seconds.items()
    }


def _plain_prefix(setup: Setup, trainable: tuple[str, ...]) -> nn.Module:
    """The frozen groups of a plain copy of the model, unfolded, chained as the view chains
    them (the baseline's and the old trainer's frozen forward)."""
    model = copy.deepcopy(setup.model)
    stages = forward_stages(model, setup.config.arch, setup.groups) or []
    frozen = []
    for stage in stages:
        if stage.group in trainable:
            break
        frozen.append(stage.module)
    return nn.Sequential(*frozen).requires_grad_(False)


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


def data_item_costs(setup: Setup, count: int) -> dict[str, float]:
    """Microseconds per training image of each input pipeline, interleaved in chunks."""
    cached = trainer_pipeline(setup, 0).train_loader.dataset
    tutorial = datasets.ImageFolder(
        str(setup.root / "train"), transform=tutorial_transform(setup.pre.input_size[0])
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
    spent = dict.fromkeys(items, 0.0)
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


@dataclass(frozen=True)
class Setup:
    """Everything the sides share."""

    root: Path
    split: DatasetSplit
    config: TrainConfig
    pre: Preprocessing
    model: nn.Module
    groups: list[LayerGroup]
    amp_dtype: torch.dtype | None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per side and phase")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument(
        "--head-rounds", type=int, default=3, help="rounds of the whole head phase per side"
    )
    parser.add_argument(
        "--baseline-workers",
        type=int,
        default=0,
        help="DataLoader workers of the baseline; 0 is its fastest setting on a 2-core machine "
        "(workers take the cores the model needs)",
    )
    parser.add_argument("--data", type=Path, help="ImageFolder root; default: generated data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op threads of every side; default: the trainer's own choice "
        "(process_setup.configure_threads: the CPUs this process may use)",
    )
    parser.add_argument("--output", type=Path, default=Path("bench-output/train_throughput.json"))
    args = parser.parse_args(argv)
    if (
        args.steps < 2
        or args.batch_size < 2
        or args.image_size < 16
        or args.warmup_steps < 0
        or args.head_rounds < 1
    ):
        parser.error(
            "need --steps >= 2, --batch-size >= 2, --image-size >= 16, --warmup-steps >= 0, "
            "--head-rounds >= 1"
        )
    if args.data is not None and not (args.data / "train").is_dir():
        parser.error(f"--data {args.data}: no train/ folder (expected DATA/train/<class>/*)")
    return args


def build_setup(root: Path, output: Path, args: argparse.Namespace) -> Setup:
    split = scan_dataset(root, val_fraction=0.2, seed=args.seed)
    # What preprocessing_for gives for weights without metadata at this crop size.
    pre = Preprocessing(
        (args.image_size, args.image_size),
        round(args.image_size / 0.875),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    # The defaults of a fine-tune from pretrained weights, resolved as trainer.run does.
    config = resolve_defaults(
        TrainConfig(
            data=root,
            output=output,
            arch=args.arch,
            image_size=args.image_size,
            batch_size=args.batch_size,
            seed=args.seed,
        ),
        device_type="cpu",
        dataset_cached=True,
        cpu_count=os.cpu_count() or 1,
        input_size=args.image_size,
    )
    model = create_model(args.arch, len(split.classes))
    amp_dtype, _ = select_amp(config.amp, CPU)
    return Setup(root, split, config, pre, model, layer_groups(model, args.arch), amp_dtype)


def measure(setup: Setup, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every measurement of the report, in the order the tables show them."""
    group_names = [g.name for g in setup.groups]
    plan = phases.build_phases(
        group_names,
        head_epochs=1,
        finetune_epochs=1,
        policy="top:1",
        lr=1e-4,
        head_lr=setup.config.head_lr,
        lr_decay=0.3,
        freeze_bn=bool(setup.config.freeze_bn),  # resolved: on for a pretrained start
    )
    head, finetune = plan
    print("measuring the head phase ...", file=sys.stderr, flush=True)
    head_phase = run_head_phase(setup, args, tmp)
    print("measuring phase 2 ...", file=sys.stderr, flush=True)
    results = [run_steps(phases.FINETUNE_PHASE, finetune, setup, args, evidence=True)]
    print("measuring the streamed head phase ...", file=sys.stderr, flush=True)
    results.append(run_steps(STREAMED, head, setup, args, evidence=False))
    print("measuring where the time goes ...", file=sys.stderr, flush=True)
    batch = next(iter(trainer_pipeline(setup, args.seed).train_loader))
    return {
        "head_phase": head_phase,
        "phases": results,
        "finetune_step_parts": finetune_step_parts(setup, finetune, batch, 10),
        "prefix_forward": prefix_forward_variants(setup, finetune.groups_at(1), 12),
        "feature_extraction_images_per_second": extraction_paths(setup, batch[0], 10),
        "data_us_per_image": data_item_costs(setup, 200),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        configure_threads()
    started = time.perf_counter()
    load_at_start = [round(v, 2) for v in os.getloadavg()]
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
        measured = measure(setup, args, Path(tmp))
        forward = counted_flops_per_image(setup.model, args.image_size, None)
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
        "val_images": len(setup.split.val),
        "baseline_workers": args.baseline_workers,
        "trainer_amp": str(amp).removeprefix("torch.") if amp else "off (fp32)",
        "threads": torch.get_num_threads(),
        "forward_gflops_per_image": forward / 1e9,
        "full_training_gflops_per_image": 3 * forward / 1e9,
        "matmul_gflops_per_second": {k: v / 1e9 for k, v in peaks.items()},
        **measured,
        "gpu_resnet50_224": "no GPU lent",
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "load_average_1_5_15_start": load_at_start,
            "load_average_1_5_15_end": [round(v, 2) for v in os.getloadavg()],
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(format_table(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = args.output.with_name(args.output.name + ".tmp")
    tmp_path.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_path, args.output)
    print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------- tables


def format_table(report: dict[str, Any]) -> str:
    """The Markdown tables of ``report``."""
    machine = report["machine"]
    lines = [
        f"{report['arch']} at {report['image_size']} px, batch {report['batch_size']}, "
        f"{report['threads']} threads, {report['train_images']} training and "
        f"{report['val_images']} val images, trainer amp {report['trainer_amp']}; "
        f"{report['date']}, load average {machine['load_average_1_5_15_start']} at the start, "
        f"{machine['load_average_1_5_15_end']} at the end, {report['wall_seconds']} s",
        "",
        *_head_phase_table(report),
        "",
        *_steps_table(report),
        "",
        "| phase-2 step part (same batch) | ms |",
        "|---|---:|",
        *(f"| {name} | {v['ms']:.1f} |" for name, v in report["finetune_step_parts"].items()),
        "",
        "| phase 2's frozen part, forward only | img/s | vs baseline |",
        "|---|---:|---:|",
        *(
            f"| {name} | {v['images_per_second']:.1f} | {v['vs_baseline']:.2f}x |"
            for name, v in report["prefix_forward"].items()
        ),
        "",
        "| head phase feature extraction, forward only | img/s |",
        "|---|---:|",
        *(
            f"| {name} | {rate:.1f} |"
            for name, rate in report["feature_extraction_images_per_second"].items()
        ),
        "",
        "| input pipeline, per training image | us |",
        "|---|---:|",
        *(f"| {name} | {micros:.0f} |" for name, micros in report["data_us_per_image"].items()),
        "",
        *_ceiling_table(report),
    ]
    return "\n".join(lines)


def _head_phase_table(report: dict[str, Any]) -> list[str]:
    head = report["head_phase"]
    verdict = "met" if head["meets_target"] else "**missed**"
    stage = head["head_stage"]
    images = stage.get("backbone_images") or 0
    fit = stage.get("fit_seconds") or 0.0
    rates = list(report["feature_extraction_images_per_second"].values())
    lines = [
        "| head phase, whole | seconds | speedup (rounds) | target |",
        "|---|---:|---|---|",
        f"| baseline: {head['head_epochs']} epochs of frozen-backbone training "
        f"({head['head_epochs'] * report['train_images']} images) | "
        f"{head['baseline_seconds']:.2f} | | |",
        f"| trainer: feature cache ({head['feature_views']} views, {images} images) + probe "
        f"+ head fit | {head['trainer_seconds']:.2f} | **{head['speedup']:.2f}x** "
        f"({', '.join(f'{r:.2f}' for r in head['round_speedups'])}) | "
        f">= {head['target']}x: {verdict} |",
        "",
        f"Of the trainer's head phase, the probe and head fit take {fit:.2f} s (redone alone on "
        f"its cache) and the rest, {head['trainer_seconds'] - fit:.2f} s, is the feature "
        f"extraction (and the cache file). The tutorial loop takes "
        f"{head['tutorial_seconds_per_epoch']:.2f} s an epoch: the target is met from "
        f"{head['head_epochs_for_target']} head epochs on.",
    ]
    if images and len(rates) == 2 and all(rates):
        what_if = images / rates[1] + fit
        lines.append(
            f"Extraction through the training view instead ({rates[1]:.0f} against "
            f"{rates[0]:.0f} img/s, forward only): about {what_if:.2f} s, "
            f"{head['baseline_seconds'] / what_if:.2f}x."
        )
    return lines


def _steps_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| phase | side | img/s | data ms/img | compute ms/img | speedup (p10-p90 of steps) "
        "| target |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in report["phases"]:
        for name, side in row["sides"].items():
            ratio = target = ""
            if "speedup" in side:
                p10, _, p90 = side["step_speedup_p10_p50_p90"]
                ratio = f"{side['speedup']:.2f}x ({p10:.2f}-{p90:.2f})"
            if name == DEFAULT_SIDE and row["target"] is not None:
                verdict = "met" if row["meets_target"] else "**missed**"
                target = f">= {row['target']}x: {verdict}"
            lines.append(
                f"| {row['phase']} ({'+'.join(row['trainable_groups'])}) | {name} | "
                f"{side['images_per_second']:.1f} | {side['data_ms_per_image']:.2f} | "
                f"{side['compute_ms_per_image']:.2f} | {ratio} | {target} |"
            )
    return lines


def _ceiling_table(report: dict[str, Any]) -> list[str]:
    peak = report["matmul_gflops_per_second"]
    full = report["full_training_gflops_per_image"]
    lines = [
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
        f"forward {report['forward_gflops_per_image']:.3f} GFLOP/image; matmul 2048x2048: "
        f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; "
        f"ResNet-50 224 px on GPU: {report['gpu_resnet50_224']}",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
