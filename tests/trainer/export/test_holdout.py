"""The export copies ``DATA/holdout/<class>/`` (reviewed production images) into the version,
byte for byte, classes interleaved; unusable files and unknown class folders are left out."""

from __future__ import annotations

import shutil
from pathlib import Path

from contracts.holdout_set import HOLDOUT_DIRNAME, read_holdout_set
from trainer.export import export_checkpoint


def test_the_holdout_set_travels_with_the_version(
    tmp_path: Path, image_folder_factory, checkpoint_factory
) -> None:
    data = image_folder_factory(tmp_path / "data")
    classes = sorted(p.name for p in (data / "train").iterdir())
    holdout = data / HOLDOUT_DIRNAME
    for index, name in enumerate(classes):
        (holdout / name).mkdir(parents=True)
        for i in range(index + 1):  # 1, 2, ... images per class
            shutil.copyfile(data / "val" / name / f"{i}.png", holdout / name / f"p{i}.png")
    (holdout / classes[0] / "z-empty.png").write_bytes(b"")  # not an image: left out
    (holdout / "no-such-class").mkdir()
    shutil.copyfile(data / "val" / classes[0] / "0.png", holdout / "no-such-class" / "x.png")
    checkpoint = checkpoint_factory(tmp_path / "best.pt", "resnet18")

    result = export_checkpoint(checkpoint, tmp_path / "repo", data_dir=data)

    found = read_holdout_set(result.model_dir)
    assert found is not None
    document, images = found
    assert document.labels == tuple(classes)
    expected = sum(range(1, len(classes) + 1))
    assert len(document.images) == len(images) == expected
    # Interleaved: the first images cover every class in turn.
    assert [image.true_label for image in document.images[: len(classes)]] == list(
        range(len(classes))
    )
    first = document.images[0]
    assert images[0] == (holdout / classes[0] / "p0.png").read_bytes()
    assert first.file.endswith("p0.png") and first.true_label == 0


def test_without_a_holdout_folder_the_version_has_none(tmp_path: Path, resnet_export) -> None:
    result, _ = resnet_export
    assert read_holdout_set(result.model_dir) is None
    assert not (result.model_dir / HOLDOUT_DIRNAME).exists()
