"""KServe's layout: --model-repository may be one model's directory as well as a repository.

KServe puts the directory its storageUri names at /mnt/models: the whole repository
(/mnt/models/classifier/config.pbtxt) or, as deploy/components/kserve does, the model's own
directory (/mnt/models/config.pbtxt, /mnt/models/1/). Both are served through a real server
under the name --model-name gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from repository_factory import make_model_repository, write_version
from server_harness import RunningServer, server_config

from server.errors import ModelLoadError
from server.repository import list_models, read_model
from server.transport.model_config import parse_model_config

LAYOUTS = ("repository", "model directory")


def served_path(tmp_path: Path, layout: str) -> Path:
    """What --model-repository names: models/ (holding classifier/) or models/classifier."""
    repo = make_model_repository(tmp_path / "models", versions=(1,), num_classes=4)
    return repo if layout == "repository" else repo / "classifier"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_both_layouts_serve_the_model_named_by_model_name(tmp_path: Path, layout: str) -> None:
    path = served_path(tmp_path, layout)
    model_dir = path if layout == "model directory" else path / "classifier"
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    reference = ort.InferenceSession(
        str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    ).run(["probabilities"], {"image": images})[0]
    with RunningServer(server_config(path, model_name="classifier")) as server:
        client = triton.InferenceServerClient(server.target)
        assert client.is_model_ready("classifier")
        assert list(client.get_model_metadata("classifier").versions) == ["1"]
        assert client.get_model_config("classifier").config.name == "classifier"
        tensor = triton.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(
            "classifier", [tensor], outputs=[triton.InferRequestedOutput("probabilities")]
        )
        np.testing.assert_allclose(result.as_numpy("probabilities"), reference, atol=1e-6)
        # A version published into the mounted directory is picked up by the next poll.
        write_version(model_dir, 2, num_classes=4)
        server.call(server.handle.manager.refresh())
        assert list(client.get_model_metadata("classifier").versions) == ["2"]


def test_a_model_directory_needs_model_name(tmp_path: Path) -> None:
    model_dir = served_path(tmp_path, "model directory")
    with pytest.raises(ModelLoadError, match=r"one model's directory .* --model-name"):
        list_models(model_dir)
    assert list_models(model_dir, "classifier") == ["classifier"]
    # A repository lists its model directories whatever name is given.
    assert list_models(model_dir.parent, "anything") == ["classifier"]


def test_the_stated_name_must_match_model_name(tmp_path: Path) -> None:
    model_dir = served_path(tmp_path, "model directory")
    source = read_model(model_dir, "classifier", parse_model_config)
    assert (source.name, source.directory, [v.version for v in source.versions]) == (
        "classifier",
        model_dir,
        [1],
    )
    # config.pbtxt says "classifier"; served as "flowers" it contradicts, as a directory would.
    with pytest.raises(
        ModelLoadError, match="name 'classifier' differs from --model-name 'flowers'"
    ):
        read_model(model_dir, "flowers", parse_model_config)
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "classifier"\n', ""))
    assert read_model(model_dir, "flowers", parse_model_config).spec.name == "flowers"
