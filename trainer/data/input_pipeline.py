"""The input pipeline of a run: datasets, sampler and loaders built from the scanned split."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from contracts.preprocessing import Preprocessing
from trainer.data.augment import AugmentSettings, eval_transform, train_transform
from trainer.data.folders import (
    CachedTrainSet,
    DatasetSplit,
    EpochSampler,
    FileEvalSet,
    FileTrainSet,
    check_classes_present,
    collate_skipping_none,
    decode_all,
    eval_batches,
    should_cache,
)
from trainer.job.process_setup import DistInfo

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Pipeline:
    """Training loader (with its resumable sampler) and a factory for eval batches."""

    train_loader: DataLoader
    sampler: EpochSampler
    steps_per_epoch: int
    eval_batches: Callable[[], Batches]
    cached: bool
    train_images: int
    val_images: int
    # The class of each training image the loader yields: decoded ones only when cached (a
    # streamed run finds its unreadable files while it trains).
    train_labels: list[int]


def dataset_fits_cache(split: DatasetSplit, pre: Preprocessing, cache_max_mb: int) -> bool:
    """Whether the split is decoded once into memory (it fits in ``cache_max_mb`` MiB)."""
    total = len(split.train) + len(split.val)
    return cache_max_mb > 0 and should_cache(total, pre.resize_size, cache_max_mb)


def build_pipeline(  # noqa: PLR0913  keyword-only settings, each a config field of the run
    split: DatasetSplit,
    *,
    pre: Preprocessing,
    aug: AugmentSettings,
    batch_size: int,
    seed: int,
    strict: bool,
    cache_max_mb: int,
    num_workers: int | None,
    info: DistInfo,
    device: torch.device,
) -> Pipeline:
    """Decode (or prepare to stream) the split and build the loaders for this rank."""
    total = len(split.train) + len(split.val)
    cached = dataset_fits_cache(split, pre, cache_max_mb)
    threads = os.cpu_count() or 1
    eval_tf = eval_transform(pre)
    train_tf = train_transform(pre, aug)
    if cached:
        train_images, train_labels = decode_all(
            split.train, shorter_side=pre.resize_size, strict=strict, threads=threads
        )
        val_images, val_labels = decode_all(
            split.val, shorter_side=pre.resize_size, strict=strict, threads=threads
        )
        check_classes_present(train_labels, split.classes, "train")
        check_classes_present(val_labels, split.classes, "val")
        train_set: torch.utils.data.Dataset = CachedTrainSet(
            train_images, train_labels, train_tf, seed
        )
        # The eval crop is deterministic: do it once. Each rank keeps its own share.
        eval_x = torch.stack([eval_tf(img) for img in val_images])[info.rank :: info.world_size]
        eval_y = torch.tensor(val_labels, dtype=torch.long)[info.rank :: info.world_size]
        n_train, n_val = len(train_images), len(val_images)

        def make_eval() -> Batches:
            return eval_batches(eval_x, eval_y, batch_size * 2)

        log.info(
            "decoded %d images once into memory (shorter side %d px)%s",
            n_train + n_val,
            pre.resize_size,
            f"; {total - n_train - n_val} unreadable skipped" if n_train + n_val < total else "",
        )
    else:
        train_set = FileTrainSet(split.train, train_tf, seed, strict)
        eval_set = torch.utils.data.Subset(
            FileEvalSet(split.val, eval_tf), range(info.rank, len(split.val), info.world_size)
        )
        n_train, n_val = len(split.train), len(split.val)
        train_labels = [sample.label for sample in split.train]
        eval_workers = num_workers if num_workers is not None else min(8, threads)
        eval_loader = DataLoader(
            eval_set,
            batch_size=batch_size * 2,
            num_workers=eval_workers,
            collate_fn=collate_skipping_none,
            pin_memory=device.type == "cuda",
        )

        def make_eval() -> Batches:
            return eval_loader

    workers = num_workers if num_workers is not None else (0 if cached else min(8, threads))
    per_rank = math.ceil(n_train / info.world_size)
    # BatchNorm cannot train on a batch of one image; drop the ragged tail when there is one.
    drop_last = per_rank >= batch_size
    sampler = EpochSampler(
        n_train, num_replicas=info.world_size, rank=info.rank, seed=seed, drop_last=False
    )
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        # Its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's dropout/MixUp draws would differ from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )
    steps = (
        sampler.num_samples // batch_size
        if drop_last
        else math.ceil(sampler.num_samples / batch_size)
    )
    return Pipeline(loader, sampler, steps, make_eval, cached, n_train, n_val, train_labels)
