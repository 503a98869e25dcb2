"""The image folder: scanning, splitting, decoding, and the documented data errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from trainer_helpers import make_image_folder

from contracts.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from trainer.data.augment import AugmentSettings
from trainer.data.folders import EpochSampler, decode_image, scan_dataset
from trainer.data.input_pipeline import LoaderSettings, build_pipeline
from trainer.errors import DataError
from trainer.job.process_setup import DistInfo

PRE = Preprocessing((32, 32), 37, IMAGENET_MEAN, IMAGENET_STD)


def _pipeline(root: Path, strict: bool = False, cache_max_mb: int = 64):
    split = scan_dataset(root, val_fraction=0.25, seed=0)
    return build_pipeline(
        split,
        pre=PRE,
        aug=AugmentSettings(),
        loading=LoaderSettings(
            batch_size=4,
            seed=0,
            strict=strict,
            cache_max_mb=cache_max_mb,
            num_workers=0,
            pin_memory=False,
        ),
        info=DistInfo(0, 1, 0),
    )


def test_every_format_decodes_to_rgb_uint8(image_folder: Path) -> None:
    for suffix in ("png", "jpg", "bmp", "webp"):
        path = next((image_folder / "train" / "circle").glob(f"*.{suffix}"))
        image = decode_image(path)
        assert image.dtype == torch.uint8 and image.shape == (3, 40, 48)


def test_scan_reports_classes_and_fingerprint(image_folder: Path) -> None:
    split = scan_dataset(image_folder, val_fraction=0.2, seed=0)
    assert split.classes == ["circle", "square", "triangle"]
    assert len(split.train) == 24 and len(split.val) == 9
    assert split.fingerprint["file_count"] == 33 and len(split.fingerprint["sha256"]) == 64


def test_without_val_a_seeded_stratified_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, train_per_class=10, val_per_class=None)
    a = scan_dataset(root, val_fraction=0.3, seed=1)
    b = scan_dataset(root, val_fraction=0.3, seed=1)
    assert [s.path for s in a.val] == [s.path for s in b.val]
    assert sorted(s.label for s in a.val) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not {s.path for s in a.val} & {s.path for s in a.train}


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "absent", val_fraction=0.2, seed=0)


def test_missing_train_folder(tmp_path: Path) -> None:
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ folder"):
        scan_dataset(tmp_path, val_fraction=0.2, seed=0)


def test_single_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, classes=("only",))
    with pytest.raises(DataError, match="at least 2 are needed"):
        scan_dataset(root, val_fraction=0.2, seed=0)


def test_empty_class(image_folder: Path) -> None:
    (image_folder / "train" / "empty").mkdir()
    (image_folder / "train" / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class 'empty' .* has no images"):
        scan_dataset(image_folder, val_fraction=0.2, seed=0)


def test_val_classes_must_match_train(image_folder: Path) -> None:
    (image_folder / "val" / "square").rename(image_folder / "val" / "squares")
    with pytest.raises(DataError, match="only in train: \\['square'\\]"):
        scan_dataset(image_folder, val_fraction=0.2, seed=0)


def test_corrupt_image_skipped_with_its_name(image_folder: Path, caplog) -> None:
    bad = image_folder / "train" / "square" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with caplog.at_level(logging.WARNING):
        pipeline = _pipeline(image_folder)
    assert pipeline.train_images == 24  # 25 files, one skipped
    assert "skipped 1 unreadable image(s)" in caplog.text and "broken.jpg" in caplog.text


def test_corrupt_image_fatal_with_strict_data(image_folder: Path) -> None:
    (image_folder / "train" / "square" / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"broken\.png"):
        _pipeline(image_folder, strict=True)


def test_class_left_empty_by_corrupt_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, train_per_class=2)
    for path in (root / "train" / "square").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(
        DataError, match="no readable train images left for class\\(es\\) \\['square'\\]"
    ):
        _pipeline(root)


def test_cached_and_streaming_pipelines_give_the_same_batches(image_folder: Path) -> None:
    cached = _pipeline(image_folder)
    assert cached.cached and cached.steps_per_epoch == 6
    streamed = _pipeline(image_folder, cache_max_mb=0)
    assert not streamed.cached
    x_cached, y_cached = next(iter(cached.eval_batches()))
    x_streamed, y_streamed = next(iter(streamed.eval_batches()))
    assert x_cached.shape == (8, 3, 32, 32) and x_cached.dtype == torch.uint8
    assert torch.equal(y_cached, y_streamed)
    # The cache is shrunk once with antialiasing before the crop: close, not bit-equal.
    assert (x_cached.float() - x_streamed.float()).abs().mean() < 8
    images, labels = next(iter(cached.train_loader))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)


def test_sampler_resumes_mid_epoch_in_the_same_order() -> None:
    sampler = EpochSampler(10, num_replicas=1, rank=0, seed=3, drop_last=False)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_start(4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    assert all(epoch == 2 for _, epoch in full)


@pytest.mark.slow
def test_unreadable_files_are_not_counted_as_decoded_or_in_the_class_counts(
    tmp_path: Path, caplog
) -> None:
    from trainer_helpers import make_image_folder, tiny_config

    from trainer.run import train

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), train_per_class=4)
    (data / "train" / "a" / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.INFO):
        summary = train(tiny_config(data, tmp_path / "out"))
    assert "decoded 14 images once into memory" in caplog.text
    assert "; 1 unreadable skipped" in caplog.text
    assert summary["class_balance"]["counts"] == [4, 4]
