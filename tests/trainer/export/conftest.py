"""Fixtures of the export tests (the builders live in export_fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
from export_fixtures import make_checkpoint, make_image_folder

from trainer.export import ExportResult, export_checkpoint


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


# One export per architecture family for the whole session: exporting is the slow part.
@pytest.fixture(scope="session")
def resnet_export(tmp_path_factory, image_folder) -> tuple[ExportResult, Path]:
    root = tmp_path_factory.mktemp("resnet")
    checkpoint = make_checkpoint(root / "best.pt", "resnet18", ema=True)
    result = export_checkpoint(checkpoint, root / "repo", data_dir=image_folder)
    return result, checkpoint


@pytest.fixture(scope="session")
def mobilenet_export(tmp_path_factory, checkpoint_factory) -> tuple[ExportResult, Path]:
    root = tmp_path_factory.mktemp("mobilenet")
    checkpoint = make_checkpoint(root / "best.pt", "mobilenet_v3_small", head_hidden=16, seed=1)
    result = export_checkpoint(
        checkpoint, root / "repo", model_name="mnv3", input_format="float32-nchw"
    )
    return result, checkpoint
