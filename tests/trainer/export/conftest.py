"""Fixtures of the export tests (the builders live in export_fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
from export_fixtures import make_checkpoint, make_image_folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def checkpoint_factory():
    """``make_checkpoint`` for tests that need their own checkpoint."""
    return make_checkpoint


@pytest.fixture(scope="session")
def image_folder_factory():
    """``make_image_folder`` for tests that need their own data."""
    return make_image_folder
