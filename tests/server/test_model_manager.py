"""Model manager: warm-up failures are rejected, several instances serve, leases hold versions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry
from repository_factory import make_model_repository, write_failing_version, write_version
from server_harness import server_config

from server.metrics import ServerMetrics
from server.model_manager import ModelManager
from server.transport.model_config import parse_model_config
from server.types import Tensor


def _image(array: np.ndarray) -> Tensor:
    return Tensor("image", "UINT8", array)


def test_warm_up_failure_is_rejected_and_old_version_serves(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    registry = CollectorRegistry()

    async def scenario() -> tuple[str, str]:
        manager = ModelManager(server_config(repo), ServerMetrics(registry), parse_model_config)
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
        manager = ModelManager(
            server_config(repo, instances=2, max_batch_size=1),
            ServerMetrics(CollectorRegistry()),
            parse_model_config,
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
        manager = ModelManager(server_config(repo), ServerMetrics(registry), parse_model_config)
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
