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


@dataclass(frozen=True)
class LoaderSettings:
    """How the run's images are read and batched; each a config field of the run.

    Attributes:
        strict: an unreadable image is an error (else it is skipped, logged).
        cache_max_mb: the split is decoded once into memory when it fits in this many MiB.
        num_workers: loader worker processes (None: none for a cached split, else up to 8).
        pin_memory: page-locked batches, for a CUDA device.
    """

    batch_size: int
    seed: int
    strict: bool
    cache_max_mb: int
    num_workers: int | None
    pin_memory: bool


@dataclass(frozen=True)
class _Datasets:
    """This rank's training set and eval batches, and the counts of the images kept."""

    train_set: torch.utils.data.Dataset
    eval_batches: Callable[[], Batches]
    train_images: int
    val_images: int
    train_labels: list[int]


def build_pipeline(
    split: DatasetSplit,
    *,
    pre: Preprocessing,
    aug: AugmentSettings,
    loading: LoaderSettings,
    info: DistInfo,
) -> Pipeline:
    """Decode (or prepare to stream) the split and build the loaders for this rank."""
    cached = dataset_fits_cache(split, pre, loading.cache_max_mb)
    if cached:
        datasets = _decoded_once(split, pre, aug, loading, info)
    else:
        datasets = _streamed(split, pre, aug, loading, info)
    workers = loading.num_workers
    if workers is None:
        workers = 0 if cached else min(8, os.cpu_count() or 1)
    loader, sampler, steps = _train_loader(datasets, loading, info, workers)
    return Pipeline(
        loader,
        sampler,
        steps,
        datasets.eval_batches,
        cached,
        datasets.train_images,
        datasets.val_images,
        datasets.train_labels,
    )


def _decoded_once(
    split: DatasetSplit,
    pre: Preprocessing,
    aug: AugmentSettings,
    loading: LoaderSettings,
    info: DistInfo,
) -> _Datasets:
    """Every image decoded into memory once, at the shorter side the crops start from."""
    threads = os.cpu_count() or 1
    train_images, train_labels = decode_all(
        split.train, shorter_side=pre.resize_size, strict=loading.strict, threads=threads
    )
    val_images, val_labels = decode_all(
        split.val, shorter_side=pre.resize_size, strict=loading.strict, threads=threads
    )
    check_classes_present(train_labels, split.classes, "train")
    check_classes_present(val_labels, split.classes, "val")
    train_set = CachedTrainSet(train_images, train_labels, train_transform(pre, aug), loading.seed)
    # The eval crop is deterministic: do it once. Each rank keeps its own share.
    eval_tf = eval_transform(pre)
    eval_x = torch.stack([eval_tf(img) for img in val_images])[info.rank :: info.world_size]
    eval_y = torch.tensor(val_labels, dtype=torch.long)[info.rank :: info.world_size]
    n_train, n_val = len(train_images), len(val_images)

    def make_eval() -> Batches:
        return eval_batches(eval_x, eval_y, loading.batch_size * 2)

    total = len(split.train) + len(split.val)
    log.info(
        "decoded %d images once into memory (shorter side %d px)%s",
        n_train + n_val,
        pre.resize_size,
        f"; {total - n_train - n_val} unreadable skipped" if n_train + n_val < total else "",
    )
    return _Datasets(train_set, make_eval, n_train, n_val, train_labels)


def _streamed(
    split: DatasetSplit,
    pre: Preprocessing,
    aug: AugmentSettings,
    loading: LoaderSettings,
    info: DistInfo,
) -> _Datasets:
    """The images read from their files at every epoch (the split does not fit the cache)."""
    train_set = FileTrainSet(split.train, train_transform(pre, aug), loading.seed, loading.strict)
    eval_set = torch.utils.data.Subset(
        FileEvalSet(split.val, eval_transform(pre)),
        range(info.rank, len(split.val), info.world_size),
    )
    threads = os.cpu_count() or 1
    eval_workers = loading.num_workers if loading.num_workers is not None else min(8, threads)
    eval_loader = DataLoader(
        eval_set,
        batch_size=loading.batch_size * 2,
        num_workers=eval_workers,
        collate_fn=collate_skipping_none,
        pin_memory=loading.pin_memory,
    )

    def make_eval() -> Batches:
        return eval_loader

    train_labels = [sample.label for sample in split.train]
    return _Datasets(train_set, make_eval, len(split.train), len(split.val), train_labels)


def _train_loader(
    datasets: _Datasets, loading: LoaderSettings, info: DistInfo, workers: int
) -> tuple[DataLoader, EpochSampler, int]:
    """The training loader over this rank's share, its resumable sampler, steps per epoch."""
    batch_size, seed = loading.batch_size, loading.seed
    per_rank = math.ceil(datasets.train_images / info.world_size)
    # BatchNorm cannot train on a batch of one image; drop the ragged tail when there is one.
    drop_last = per_rank >= batch_size
    sampler = EpochSampler(
        datasets.train_images,
        num_replicas=info.world_size,
        rank=info.rank,
        seed=seed,
        drop_last=False,
    )
    loader = DataLoader(
        datasets.train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=loading.pin_memory,
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
    return loader, sampler, steps
