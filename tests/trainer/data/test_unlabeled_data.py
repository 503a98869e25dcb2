"""``--unlabeled-data DIR``: any folder of images, decoded as training data is, and the usage
errors of a folder that cannot serve (exit 2, one line naming the folder and the count)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from trainer_helpers import make_capture_folder, make_image_folder, tiny_train_args

from trainer.cli import main
from trainer.config import resolve_config
from trainer.data.unlabeled import UnlabeledStream, image_files, load_unlabeled_images
from trainer.errors import DataError


def test_every_image_file_is_found_recursively_sidecars_and_hidden_ignored(tmp_path: Path):
    root = make_capture_folder(tmp_path / "captures", count=4, corrupt=1)
    (root / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".cache" / "hidden.png")
    (root / "notes.txt").write_text("ignored")
    found = image_files(root)
    assert len(found) == 5
    assert all(p.suffix == ".jpg" for p in found)


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = make_capture_folder(tmp_path / "captures", count=4, corrupt=2)
    loaded = load_unlabeled_images(root, shorter_side=20, seed=0)
    assert loaded.facts() == {"files_found": 6, "images_used": 4, "skipped_unreadable": 2}
    assert all(img.dtype == torch.uint8 and min(img.shape[-2:]) == 20 for img in loaded.images)
    crops = loaded.eval_crops(lambda image: image[:, :16, :16], batch_size=3)
    assert [tuple(batch.shape) for batch in crops] == [(3, 3, 16, 16), (1, 3, 16, 16)]


def test_at_most_limit_images_are_decoded(tmp_path: Path) -> None:
    root = make_capture_folder(tmp_path / "captures", count=6, corrupt=1)
    loaded = load_unlabeled_images(root, shorter_side=16, seed=3, limit=3)
    assert len(loaded.images) == 3 and loaded.files_found == 7
    assert loaded.skipped <= 1


def test_the_stream_is_a_pure_function_of_the_step(tmp_path: Path) -> None:
    images = [torch.full((3, 10, 10), i, dtype=torch.uint8) for i in range(5)]
    first = UnlabeledStream(images, lambda x: x[:, :8, :8], batch_size=2, seed=1)
    again = UnlabeledStream(images, lambda x: x[:, :8, :8], batch_size=2, seed=1)
    assert torch.equal(first.batch_at(7), again.batch_at(7))
    assert first.batch_at(0).shape == (2, 3, 8, 8)
    # One pass over the images in the first steps: each image once.
    seen = torch.cat([first.batch_at(s)[:, 0, 0, 0] for s in range(2)]).tolist()
    seen += first.batch_at(2)[:1, 0, 0, 0].tolist()
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_the_setting_is_a_flag_an_environment_variable_and_a_yaml_key(tmp_path: Path) -> None:
    base = {"data": tmp_path, "output": tmp_path / "out"}
    assert resolve_config(environ={}, flags=base).unlabeled_data is None
    flagged = resolve_config(environ={}, flags=base | {"unlabeled_data": str(tmp_path / "u")})
    assert flagged.unlabeled_data == tmp_path / "u"
    env = resolve_config(environ={"TRAINER_UNLABELED_DATA": "/srv/captures"}, flags=base)
    assert env.unlabeled_data == Path("/srv/captures")
    file = tmp_path / "config.yaml"
    file.write_text("unlabeled_data: /srv/yaml\n")
    assert resolve_config(file=file, environ={}, flags=base).unlabeled_data == Path("/srv/yaml")


# ---- usage errors through the command line ------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    return make_image_folder(root / "data", classes=("a", "b"), train_per_class=3)


def _train(labelled: Path, output: Path, unlabeled: Path) -> list[str]:
    extra = ("--unlabeled-data", str(unlabeled), "--finetune-epochs", "1", "--no-export")
    return tiny_train_args(labelled, output, batch_size=2, extra=extra)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("trainer: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_missing_folder_exits_2_naming_it(labelled: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    code = main(_train(labelled, tmp_path / "out", missing))
    assert code == 2
    line = _error_line(capsys.readouterr().err)
    assert line == f"trainer: error: unlabeled_data: {missing} does not exist or is not a directory"
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_folder_without_images_exits_2_with_the_count(
    labelled: Path, tmp_path: Path, capsys
) -> None:
    empty = tmp_path / "captures"
    (empty / "unlabeled" / "a").mkdir(parents=True)
    (empty / "unlabeled" / "a" / "0001.json").write_text("{}")
    code = main(_train(labelled, tmp_path / "out", empty))
    assert code == 2
    line = _error_line(capsys.readouterr().err)
    assert f"unlabeled_data: {empty} holds 0 image files" in line


def test_a_folder_of_undecodable_images_exits_2_with_the_count(
    labelled: Path, tmp_path: Path, capsys
) -> None:
    broken = make_capture_folder(tmp_path / "captures", count=0, corrupt=3)
    code = main(_train(labelled, tmp_path / "out", broken))
    assert code == 2
    line = _error_line(capsys.readouterr().err)
    assert f"unlabeled_data: none of the 3 image files in {broken} could be decoded" in line
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_load_refuses_the_same_folders_directly(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_unlabeled_images(tmp_path / "nope", shorter_side=16, seed=0)
