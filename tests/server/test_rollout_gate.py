"""A new version goes live only if it keeps the previous version's golden set about as right,
and does about as well as the previous version on its own holdout set of production images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from repository_factory import make_model_repository, write_version
from server_harness import RunningServer, server_config

from client.api import InferenceClient
from contracts.golden_set import GOLDEN_DIRNAME, GOLDEN_FILENAME
from contracts.holdout_set import HOLDOUT_DIRNAME, HOLDOUT_FILENAME, HOLDOUT_FORMAT, HoldoutSet


def _label_golden_set_with_its_own_answers(version_dir: Path) -> list[int]:
    """True classes = the version's own top-1: its accuracy on its golden set is 1.0."""
    path = version_dir / GOLDEN_DIRNAME / GOLDEN_FILENAME
    document = json.loads(path.read_text())
    for image in document["images"]:
        image["true_label"] = image["top1"]
    path.write_text(json.dumps(document))
    return [image["top1"] for image in document["images"]]


def _golden_top1(version_dir: Path) -> list[int]:
    document = json.loads((version_dir / GOLDEN_DIRNAME / GOLDEN_FILENAME).read_text())
    return [image["top1"] for image in document["images"]]


def _served_versions(server: RunningServer) -> list[str]:
    return [model.version_str for model in server.handle.manager.versions("classifier")]


def test_a_version_worse_on_the_previous_golden_set_is_refused(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    truth = _label_golden_set_with_its_own_answers(repo / "classifier" / "1")
    with RunningServer(server_config(repo)) as server:
        # Version 2 is another random model: it disagrees with version 1 on some images.
        write_version(repo / "classifier", 2)
        assert _golden_top1(repo / "classifier" / "2") != truth
        server.call(server.handle.manager.refresh())
        assert _served_versions(server) == ["1"]
        assert server.sample("model_rollout_refusals_total", {"model": "classifier"}) == 1
        with InferenceClient(server.target) as client:
            assert client.model_metadata("classifier").versions == ("1",)


def test_a_version_as_good_rolls_out(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    _label_golden_set_with_its_own_answers(repo / "classifier" / "1")
    with RunningServer(server_config(repo)) as server:
        # The same graph published again as version 2 keeps every answer.
        shutil.copytree(repo / "classifier" / "1", tmp_path / "v2")
        (tmp_path / "v2").rename(repo / "classifier" / "2")
        server.call(server.handle.manager.refresh())
        assert _served_versions(server) == ["2"]
        assert server.sample("model_rollout_refusals_total", {"model": "classifier"}) == 0


def test_the_gate_can_be_switched_off(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    _label_golden_set_with_its_own_answers(repo / "classifier" / "1")
    config = server_config(repo, rollout_max_accuracy_drop=1.0)
    with RunningServer(config) as server:
        write_version(repo / "classifier", 2)
        server.call(server.handle.manager.refresh())
        assert _served_versions(server) == ["2"]


def test_without_labelled_golden_images_there_is_no_gate(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))  # no true labels
    with RunningServer(server_config(repo)) as server:
        write_version(repo / "classifier", 2)
        server.call(server.handle.manager.refresh())
        assert _served_versions(server) == ["2"]


def _write_holdout(version_dir: Path, source_dir: Path, true_labels: list[int]) -> None:
    """A holdout set in ``version_dir``: ``source_dir``'s golden images with ``true_labels``."""
    golden = json.loads((source_dir / GOLDEN_DIRNAME / GOLDEN_FILENAME).read_text())
    holdout = version_dir / HOLDOUT_DIRNAME
    holdout.mkdir()
    images = []
    for image, label in zip(golden["images"], true_labels, strict=True):
        shutil.copyfile(source_dir / GOLDEN_DIRNAME / image["file"], holdout / image["file"])
        images.append({"file": image["file"], "true_label": label})
    document = HoldoutSet.from_dict(
        {"format": HOLDOUT_FORMAT, "labels": golden["labels"], "images": images}
    )
    (holdout / HOLDOUT_FILENAME).write_text(json.dumps(document.to_dict()))


def _publish_with_holdout(repo: Path, tmp_path: Path, labelled_by: int) -> list[int]:
    """Version 2, another random model, whose holdout set is the golden images labelled with
    version ``labelled_by``'s own answers; returns both versions' answers."""
    staged = write_version(tmp_path / "staging", 2)
    answers = {1: _golden_top1(repo / "classifier" / "1"), 2: _golden_top1(staged)}
    assert answers[1] != answers[2]
    _write_holdout(staged, staged, answers[labelled_by])
    staged.rename(repo / "classifier" / "2")
    return answers[labelled_by]


def test_a_version_worse_on_its_holdout_set_is_refused_after_a_restart_too(
    tmp_path: Path,
) -> None:
    # No labelled golden images: only the holdout set can tell the versions apart.
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    with RunningServer(server_config(repo)) as server:
        _publish_with_holdout(repo, tmp_path, labelled_by=1)
        server.call(server.handle.manager.refresh())
        assert _served_versions(server) == ["1"]
        assert server.sample("model_rollout_refusals_total", {"model": "classifier"}) == 1
    record = json.loads((repo / "classifier" / "2.verdict.json").read_text())
    assert record["accepted"] is False and record["holdout_images"] == 4
    assert record["holdout_baseline_accuracy"] == 1.0 and record["holdout_accuracy"] < 1.0
    assert "holdout set of reviewed production images" in record["reason"]
    with RunningServer(server_config(repo)) as server:  # the verdict holds
        assert _served_versions(server) == ["1"]
    # An operator who allows any drop lets it through without deleting the verdict.
    with RunningServer(server_config(repo, rollout_max_accuracy_drop=1.0)) as server:
        assert _served_versions(server) == ["2"]


def test_a_version_better_on_its_holdout_set_rolls_out(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    with RunningServer(server_config(repo)) as server:
        _publish_with_holdout(repo, tmp_path, labelled_by=2)
        server.call(server.handle.manager.refresh())
        assert _served_versions(server) == ["2"]
        assert server.sample("model_rollout_refusals_total", {"model": "classifier"}) == 0


def test_an_unreadable_holdout_set_refuses_the_version(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    with RunningServer(server_config(repo)) as server:
        staged = write_version(tmp_path / "staging", 2)
        (staged / HOLDOUT_DIRNAME).mkdir()
        (staged / HOLDOUT_DIRNAME / HOLDOUT_FILENAME).write_text('{"format": "something else"}')
        staged.rename(repo / "classifier" / "2")
        server.call(server.handle.manager.refresh())
        assert _served_versions(server) == ["1"]
