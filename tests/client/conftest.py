"""Fixtures for the client tests: a real model repository and a real running server to talk to."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from repository_factory import make_model_repository
from server_harness import RunningServer, server_config


@pytest.fixture
def model_repository(tmp_path: Path) -> Path:
    """One model ``classifier``, version 1, 4 classes, 32x32 uint8 NHWC input."""
    return make_model_repository(tmp_path / "models", versions=(1,), num_classes=4)


@pytest.fixture
def running_server(model_repository: Path) -> Iterator[RunningServer]:
    with RunningServer(server_config(model_repository)) as server:
        yield server
