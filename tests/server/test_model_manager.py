"""Model manager: warm-up failures are rejected, several instances serve, leases hold versions."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from repository_factory import make_model_repository, write_failing_version, write_version
from server_harness import server_config

from server.app import create_model_manager
from server.metrics import ServerMetrics
from server.transport.model_config import parse_model_config
from server.types import Tensor


def _image(array: np.ndarray) -> Tensor:
    return Tensor("image", "UINT8", array)


def test_warm_up_failure_is_rejected_and_old_version_serves(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    registry = CollectorRegistry()

    async def scenario() -> tuple[str, str]:
        manager = create_model_manager(server_config(repo), ServerMetrics(registry))
        await manager.refresh()
        write_failing_version(repo / "classifier" / "2")
        await manager.refresh()
        await manager.refresh()  # not retried while the file is unchanged
        async with manager.lease("classifier") as model:
            outputs = await model.infer([_image(np.zeros((1, 32, 32, 3), np.uint8))], None)
            served = (model.version_str, str(outputs["probabilities"].shape))
        await manager.close()
        return served

    assert asyncio.run(scenario()) == ("1", "(1, 4)")
    assert registry.get_sample_value("model_load_failures_total", {"model": "classifier"}) == 1
    assert registry.get_sample_value("model_loads_total", {"model": "classifier"}) == 1


def test_two_instances_compute_in_parallel_with_own_answers(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")

    async def scenario() -> None:
        manager = create_model_manager(
            server_config(repo, instances=2, max_batch_size=1),
            ServerMetrics(CollectorRegistry()),
        )
        await manager.refresh()
        model = manager.resolve("classifier")
        assert model.batching is not None
        assert model.sessions.instances == 2 and model.batching.workers == 2
        inputs = [np.full((1, 32, 32, 3), i, np.uint8) for i in range(12)]
        results = await asyncio.gather(*(model.infer([_image(x)], None) for x in inputs))
        expected = [model.sessions.run({"image": x})["logits"] for x in inputs]
        for result, want in zip(results, expected, strict=True):
            np.testing.assert_allclose(result["logits"], want, rtol=1e-6)
        await manager.close()

    asyncio.run(scenario())


def test_start_falls_back_when_the_latest_version_is_broken(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    write_version(repo / "classifier", 2, corrupt=True)
    registry = CollectorRegistry()

    async def scenario() -> list[str]:
        manager = create_model_manager(server_config(repo), ServerMetrics(registry))
        await manager.refresh()
        await manager.refresh()
        served = [m.version_str for m in manager.versions("classifier")]
        write_version(repo / "classifier", 3)
        await manager.refresh()
        served.append(manager.resolve("classifier").version_str)
        await manager.close()
        return served

    assert asyncio.run(scenario()) == ["1", "3"]
    assert registry.get_sample_value("model_load_failures_total", {"model": "classifier"}) == 1


def _failures(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("model_load_failures_total", {"model": "classifier"}) or 0


def test_rejected_version_is_retried_with_backoff_and_when_its_files_change(
    tmp_path: Path,
) -> None:
    repo = make_model_repository(tmp_path / "models")
    registry = CollectorRegistry()

    async def scenario(load_retry_s: float) -> list[float]:
        config = server_config(repo, load_retry_s=load_retry_s)
        manager = create_model_manager(config, ServerMetrics(registry))
        counts = []
        await manager.refresh()
        write_failing_version(repo / "classifier" / "2")
        for _ in range(3):
            await manager.refresh()
            counts.append(_failures(registry))
        (repo / "classifier" / "2" / "notes.txt").write_text("touched")  # any file of it
        await manager.refresh()
        counts.append(_failures(registry))
        shutil.rmtree(repo / "classifier" / "2")
        write_version(repo / "classifier", 2)  # fixed: it loads and serves
        await manager.refresh()
        async with manager.lease("classifier") as model:
            counts.append(float(model.version))
        await manager.close()
        return counts

    # A long backoff: tried once, then again only because a file changed.
    assert asyncio.run(scenario(1000.0)) == [1, 1, 1, 2, 2.0]


def test_backoff_expired_retries_unchanged_version(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    registry = CollectorRegistry()

    async def scenario() -> list[float]:
        config = server_config(repo, load_retry_s=0.0)
        manager = create_model_manager(config, ServerMetrics(registry))
        await manager.refresh()
        write_failing_version(repo / "classifier" / "2")
        counts = []
        for _ in range(3):
            await manager.refresh()
            counts.append(_failures(registry))
        await manager.close()
        return counts

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_config_and_labels_changes_reload_without_failing_holders(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    config_path = repo / "classifier" / "config.pbtxt"
    registry = CollectorRegistry()

    async def scenario() -> tuple[int, int, str]:
        manager = create_model_manager(server_config(repo), ServerMetrics(registry))
        await manager.refresh()
        async with manager.lease("classifier") as old:
            text = config_path.read_text()
            config_path.write_text(text.replace("max_batch_size: 16", "max_batch_size: 8"))
            await manager.refresh()
            # The request holding the old version still computes on it.
            outputs = await old.infer([_image(np.zeros((1, 32, 32, 3), np.uint8))], None)
        async with manager.lease("classifier") as new:
            sizes = (old.max_batch_size, new.max_batch_size)
        (repo / "classifier" / "labels.txt").write_text("ant\nbee\ncat\ndog\n")
        await manager.refresh()
        await manager.refresh()  # unchanged since: no further reload
        await manager.close()
        return *sizes, str(outputs["probabilities"].shape)

    assert asyncio.run(scenario()) == (16, 8, "(1, 4)")
    assert registry.get_sample_value("model_loads_total", {"model": "classifier"}) == 3


def test_label_filename_outside_the_model_directory_is_refused(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    (tmp_path / "secret.txt").write_text("root:x:0:0\n")
    config_path = repo / "classifier" / "config.pbtxt"
    text = config_path.read_text()
    assert 'label_filename: "labels.txt"' in text
    config_path.write_text(text.replace('"labels.txt"', '"../../secret.txt"'))
    from server.errors import ModelLoadError
    from server.repository import read_model

    with pytest.raises(ModelLoadError, match="resolves outside the model directory"):
        read_model(repo, "classifier", parse_model_config)
