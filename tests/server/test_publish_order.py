"""The trainer's export publishes the version before it replaces the model-level files.

What a server polling between two steps of a publish sees is what a publish stopped between
them leaves: here ``config.pbtxt`` is over the process's file size limit, so the publish fails
right after the step before it. The model's ``labels.txt`` must then describe a version that is
published, and a real server serves that version with its own labels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
from golden_set_factory import write_golden_set
from repository_factory import build_classifier_onnx, model_json
from server_harness import RunningServer, server_config

from client.api import InferenceClient
from server.repository import read_model
from server.transport.model_config import parse_model_config
from trainer.export.repository import publish, render_config

OLD_LABELS = ["class_0", "class_1", "class_2", "class_3"]
NEW_LABELS = ["ant", "bee", "cat", "dog"]
CONFIG = render_config("classifier", input_format="uint8-nhwc", input_size=[32, 32], num_classes=4)
LIMIT = 256 * 1024  # every file of the version fits; the padded config.pbtxt does not

_CHILD = """
import json, resource, sys
from pathlib import Path
from trainer.export.repository import publish
source = Path(sys.argv[2])
files = {{
    str(p.relative_to(source)): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()
}}
config_text = Path(sys.argv[3]).read_text()
# Python ignores SIGXFSZ, so a write past the limit raises OSError (EFBIG).
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
publish(
    Path(sys.argv[1]), "classifier", version_files=files, config_text=config_text,
    labels=json.loads(sys.argv[4]),
)
"""


def _version_files(directory: Path, seed: int, labels: list[str]) -> Path:
    """A version as the exporter writes it (graph, model.json, golden set), in ``directory``."""
    directory.mkdir(parents=True)
    model = build_classifier_onnx(seed=seed)
    document = model_json(labels, (32, 32), 36)
    onnx.save(model, str(directory / "model.onnx"))
    write_golden_set(directory, model, document)
    (directory / "model.json").write_text(json.dumps(document))
    return directory


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_labels_never_describe_a_version_that_is_not_published(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    first = _version_files(tmp_path / "v1", seed=1, labels=OLD_LABELS)
    publish(
        repository, "classifier", version_files=_files(first), config_text=CONFIG,
        labels=OLD_LABELS,
    )  # fmt: skip
    second = _version_files(tmp_path / "v2", seed=2, labels=NEW_LABELS)
    padded = tmp_path / "config.pbtxt"
    padded.write_text(CONFIG + "# padding\n" * (LIMIT // 10 + 1))
    child = subprocess.run(
        [
            sys.executable, "-c", textwrap.dedent(_CHILD).format(limit=LIMIT),
            str(repository), str(second), str(padded), json.dumps(NEW_LABELS),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert child.returncode == 1 and "File too large" in child.stderr, child.stderr

    source = read_model(repository, "classifier", parse_model_config)
    newest = source.available[-1].directory
    assert source.labels == tuple(NEW_LABELS)
    assert json.loads((newest / "model.json").read_text())["labels"] == NEW_LABELS
    assert f"version 2 is published at {newest}" in child.stderr

    config = server_config(repository, state_dir=tmp_path / "state")
    with RunningServer(config) as server, InferenceClient(server.target) as client:
        assert client.model_metadata("classifier").versions == ("2",)
        image = (first / "golden" / "00-framed.png").read_bytes()
        ((prediction,),) = client.classify([image])
    assert prediction.label in NEW_LABELS
