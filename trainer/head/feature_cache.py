"""The frozen backbone's pooled features of a run's images, computed once and kept on disk.

The head phase fits the head on these features instead of pushing every image through the
frozen backbone in every epoch. The bank holds ``views`` augmented views of each training
image (view 0 is the plain eval crop), the val images, and the val images under each
label-changing candidate transform (``augment_policy`` tests them).

The file (``OUTPUT/feature_cache/features.pt``) carries a fingerprint of everything the
features depend on: the backbone's weights, the dataset's file list, the preprocessing, the
augmentation of the views, their count and the seed. A file whose fingerprint differs, or that
does not read back as a bank, is rebuilt and never used. It is written atomically (temp file,
fsync, rename), so a run stopped by SIGTERM leaves the old file or the new one, never a half.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from contracts.atomic_files import atomic_write_bytes
from trainer.head.linear_probe import LabelledFeatures

log = logging.getLogger(__name__)

CACHE_FORMAT = "finetune-feature-cache"
CACHE_VERSION = 1
CACHE_FILE = Path("feature_cache") / "features.pt"
# Sampler epochs the views are drawn with: far from the training phases' epochs.
_VIEW_EPOCH_BASE = 900_000

# Label-changing candidate transforms on uint8 NCHW batches (``augment_policy`` decides them).
CANDIDATE_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hflip": lambda x: torch.flip(x, dims=(3,)),
    "vflip": lambda x: torch.flip(x, dims=(2,)),
    "rotate90": lambda x: torch.rot90(x, k=1, dims=(2, 3)),
}


@dataclass(frozen=True)
class FeatureBank:
    """Cached features: train views, val, and val under each candidate transform."""

    train: LabelledFeatures
    val: LabelledFeatures
    val_transformed: dict[str, torch.Tensor]
    views: int

    @property
    def nbytes(self) -> int:
        tensors = [self.train.features, self.val.features, *self.val_transformed.values()]
        return sum(t.element_size() * t.numel() for t in tensors)


def weights_digest(module: nn.Module, skip_prefix: str) -> str:
    """SHA-256 of every tensor of ``module``'s state outside ``skip_prefix`` (the head)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if name == skip_prefix or name.startswith(skip_prefix + "."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A stable digest of the JSON-serialisable facts the features depend on."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def estimated_bytes(train_images: int, val_images: int, views: int, feature_dim: int) -> int:
    """Bytes of a float32 bank (val counted once plain and once per candidate transform)."""
    rows = train_images * views + val_images * (1 + len(CANDIDATE_TRANSFORMS))
    return rows * feature_dim * 4


# ---- the file ---------------------------------------------------------------------------------


def load_bank(path: Path, expected: str) -> FeatureBank | None:
    """The bank at ``path`` when it is whole and its fingerprint is ``expected``, else None."""
    if not path.is_file():
        return None
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
            raise ValueError("not a feature cache")
        if document.get("version") != CACHE_VERSION:
            raise ValueError(f"version {document.get('version')!r}")
        if document.get("fingerprint") != expected:
            log.info("feature cache %s is from another model, dataset or setting: rebuilt", path)
            return None
        bank = FeatureBank(
            train=LabelledFeatures(document["train_features"], document["train_labels"]),
            val=LabelledFeatures(document["val_features"], document["val_labels"]),
            val_transformed=dict(document["val_transformed"]),
            views=int(document["views"]),
        )
        _check_shapes(bank)
    except Exception as exc:  # any unreadable cache is rebuilt, never used
        log.warning("feature cache %s is unreadable (%s): rebuilt", path, exc)
        return None
    return bank


def _check_shapes(bank: FeatureBank) -> None:
    if len(bank.train.features) != len(bank.train.labels):
        raise ValueError("train features and labels differ in length")
    if len(bank.val.features) != len(bank.val.labels):
        raise ValueError("val features and labels differ in length")
    for name, features in bank.val_transformed.items():
        if features.shape != bank.val.features.shape:
            raise ValueError(f"{name} val features have another shape")


def save_bank(path: Path, bank: FeatureBank, key: str) -> None:
    """Write ``bank`` atomically with its fingerprint ``key``."""
    buffer = io.BytesIO()
    torch.save(
        {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "fingerprint": key,
            "views": bank.views,
            "train_features": bank.train.features,
            "train_labels": bank.train.labels,
            "val_features": bank.val.features,
            "val_labels": bank.val.labels,
            "val_transformed": bank.val_transformed,
        },
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())


# ---- computing it -------------------------------------------------------------------------------


class FeatureExtractor:
    """The input of the head module, captured by a forward hook, for uint8 batches."""

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        prepare: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.model = model
        self.head = head
        self.prepare = prepare

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_hook(
            lambda _module, inputs, _output: captured.append(inputs[0])
        )
        try:
            self.model.eval()
            self.model(self.prepare(images))
        finally:
            handle.remove()
        return captured[0].float().cpu()


def train_view_features(  # noqa: PLR0913  keyword-only view settings of the cache
    extract: FeatureExtractor,
    dataset: Any,
    *,
    indices: list[int],
    views: int,
    eval_dataset: Any,
    batch_size: int,
) -> LabelledFeatures:
    """Features of ``views`` views of each training image in ``indices``.

    View 0 goes through ``eval_dataset`` (the training dataset with the eval transform), views
    1.. through ``dataset``'s augmentation with their own sampler epochs, so the views are the
    same in every run with the same seed.
    """
    features, labels = [], []
    for view in range(views):
        source = eval_dataset if view == 0 else dataset
        keys = [(i, _VIEW_EPOCH_BASE + view) for i in indices]
        loader = DataLoader(source, batch_size=batch_size, sampler=keys, num_workers=0)
        for images, targets in loader:
            features.append(extract(images))
            labels.append(targets.long())
    if not features:
        raise ValueError("no training images on this process")
    return LabelledFeatures(torch.cat(features), torch.cat(labels))


def val_features(
    extract: FeatureExtractor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[LabelledFeatures, dict[str, torch.Tensor]]:
    """Features of the val images, plain and under each candidate transform."""
    plain, labels = [], []
    transformed: dict[str, list[torch.Tensor]] = {name: [] for name in CANDIDATE_TRANSFORMS}
    for images, targets in batches:
        if len(targets) == 0:
            continue
        plain.append(extract(images))
        labels.append(targets.long())
        for name, transform in CANDIDATE_TRANSFORMS.items():
            transformed[name].append(extract(transform(images)))
    return (
        LabelledFeatures(torch.cat(plain), torch.cat(labels)),
        {name: torch.cat(parts) for name, parts in transformed.items()},
    )


def with_transform(dataset: Any, transform: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A shallow copy of a training dataset (images shared) with another transform."""
    twin = copy.copy(dataset)
    twin.transform = transform
    return twin


def gather_bank(bank: FeatureBank) -> FeatureBank:
    """Every rank's shard of the bank, concatenated in rank order on every rank (DDP).

    Uses ``all_gather_object`` (pickled CPU tensors): the bank is bounded by
    ``feature_cache_mb``, so one exchange per run is cheap next to the forward passes.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return bank
    shards: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, bank)
    return FeatureBank(
        train=LabelledFeatures(
            torch.cat([s.train.features for s in shards]),
            torch.cat([s.train.labels for s in shards]),
        ),
        val=LabelledFeatures(
            torch.cat([s.val.features for s in shards]), torch.cat([s.val.labels for s in shards])
        ),
        val_transformed={
            name: torch.cat([s.val_transformed[name] for s in shards])
            for name in bank.val_transformed
        },
        views=bank.views,
    )
