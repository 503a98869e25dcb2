"""Fixtures of the trainer core tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_helpers import make_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Runs seed and switch on deterministic algorithms process-wide; undo it per test."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)
