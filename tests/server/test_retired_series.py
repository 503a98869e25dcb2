"""A retired version's metric series and prediction monitors are dropped (a real server).

Without it every version ever served kept its series in /metrics for the life of the process,
and a version served again fed its answers to a monitor whose series were gone.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
from repository_factory import make_model_repository, write_version
from server_harness import RunningServer, server_config

from client.api import InferenceClient

WAIT_S = 30.0


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((36, 36, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _series_of(server: RunningServer, version: str) -> list[str]:
    """Every sample of the registry labelled with the model ``classifier`` at ``version``."""
    return sorted(
        f"{sample.name}{sample.labels}"
        for family in server.registry.collect()
        for sample in family.samples
        if sample.labels.get("model") == "classifier" and sample.labels.get("version") == version
    )


def _use(server: RunningServer) -> None:
    """One Classify and one ModelInfer answer: every kind of per-version series exists."""
    with InferenceClient(server.target) as client:
        client.classify([_png(10), _png(200)])
        client.infer("classifier", {"image": np.zeros((1, 32, 32, 3), np.uint8)})


def _wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_retired_versions_series_and_monitors_are_dropped(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models", versions=(1,))
    with RunningServer(server_config(repo, state_dir=tmp_path / "state")) as server:
        manager = server.handle.manager
        _use(server)
        served = _series_of(server, "1")
        assert any(name.startswith("classification_predictions_total") for name in served)
        assert any(name.startswith("inference_requests_total") for name in served)
        assert any(name.startswith("inference_queue_depth") for name in served)

        write_version(repo / "classifier", 2)
        server.call(manager.refresh())
        _use(server)
        _wait_for(lambda: _series_of(server, "1") == [], f"series left: {_series_of(server, '1')}")
        assert _series_of(server, "2")

        # Version 1 serves again (version 2 is gone): its answers reach fresh series.
        shutil.rmtree(repo / "classifier" / "2")
        server.call(manager.refresh())
        _wait_for(lambda: _series_of(server, "2") == [], f"series left: {_series_of(server, '2')}")
        _use(server)
        labels = {"model": "classifier", "version": "1"}
        assert server.sample("classification_top_probability_count", labels) == 2
        assert server.sample("inference_requests_total", {**labels, "outcome": "success"}) == 2
