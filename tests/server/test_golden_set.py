"""The golden-set check at load: it runs for every version, refuses tampered preprocessing
facts (the previous version keeps serving, with a metric and a log line), and an unreadable
golden set is a refusal too."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from repository_factory import make_model_repository, write_version
from server_harness import server_config

from contracts.golden_set import GOLDEN_DIRNAME, GOLDEN_FILENAME, GoldenImage, GoldenSet, compare
from server.app import create_model_manager
from server.metrics import ServerMetrics


def _served_versions(
    repo: Path, registry: CollectorRegistry, tamper=None, **settings: object
) -> list[int]:
    async def scenario() -> list[int]:
        config = server_config(repo, **settings)
        manager = create_model_manager(config, ServerMetrics(registry))
        await manager.refresh()
        if tamper is not None:
            tamper()
            await manager.refresh()
        versions = [m.version for m in manager.versions("classifier")]
        await manager.close()
        return versions

    return asyncio.run(scenario())


def _edit_model_json(version_dir: Path, **changes: object) -> None:
    path = version_dir / "model.json"
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


def test_every_factory_version_passes_its_golden_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1, 2))
    registry = CollectorRegistry()
    with caplog.at_level(logging.INFO, logger="server.version_loader"):
        assert _served_versions(repo, registry) == [2]
    assert "golden set passed (4 images" in caplog.text
    assert (
        registry.get_sample_value("model_golden_set_failures_total", {"model": "classifier"})
        is None
    )


@pytest.mark.parametrize(
    ("input_format", "changes"),
    [
        ("uint8-nhwc", {"resize_size": 64}),
        ("float32-nchw", {"mean": [0.2, 0.7, 0.3]}),
        ("float32-nchw", {"resize_size": 64}),
    ],
    ids=["uint8-resize", "float-mean", "float-resize"],
)
def test_tampered_preprocessing_is_refused_and_previous_version_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, input_format: str, changes: dict
) -> None:
    repo = make_model_repository(tmp_path / "models", input_format=input_format)
    model_dir = repo / "classifier"
    registry = CollectorRegistry()

    def publish_tampered() -> None:
        staged = write_version(model_dir, 2, input_format=input_format)
        _edit_model_json(staged, **changes)

    with caplog.at_level(logging.INFO):
        assert _served_versions(repo, registry, publish_tampered) == [1]
    failures = registry.get_sample_value("model_golden_set_failures_total", {"model": "classifier"})
    assert failures == 1
    assert "version 2 rejected, previous versions keep serving: golden set failed" in caplog.text


def test_unreadable_golden_set_is_refused(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=())
    version = write_version(repo / "classifier", 1)
    (version / GOLDEN_DIRNAME / GOLDEN_FILENAME).write_text("{not json")
    registry = CollectorRegistry()
    assert _served_versions(repo, registry) == []
    assert (
        registry.get_sample_value("model_golden_set_failures_total", {"model": "classifier"}) == 1
    )


def test_version_without_golden_set_is_refused_unless_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_model_repository(tmp_path / "models", versions=())
    write_version(repo / "classifier", 1, golden=False)
    assert _served_versions(repo, CollectorRegistry()) == []
    with caplog.at_level(logging.WARNING):
        allowed = _served_versions(
            repo, CollectorRegistry(), allow_versions_without_golden_set=True
        )
    assert allowed == [1]
    assert "has no golden set" in caplog.text


def test_compare_names_top1_and_probability_differences() -> None:
    golden = GoldenSet(
        ("cat", "dog"),
        (GoldenImage("a.png", 0, (0.9, 0.1)), GoldenImage("b.png", 1, (0.3, 0.7))),
        tolerance=0.05,
    )
    assert compare(golden, [[0.88, 0.12], [0.32, 0.68]]) == []
    problems = compare(golden, [[0.4, 0.6], [0.3, 0.6]])
    assert problems == [
        "a.png: top-1 'dog' (0.6000), expected 'cat' (0.9000)",
        "b.png: probability of 'dog' 0.6000, expected 0.7000 (differs by 0.1000, tolerance 0.0500)",
    ]
    assert compare(golden, [[0.9, 0.1]]) == ["1 results for 2 golden images"]
