"""Reading the model repository: versions, policies, metadata, broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from repository_factory import make_model_repository, write_version

from server.errors import ModelLoadError
from server.repository import list_models, read_metadata, read_model
from server.transport.model_config import parse_model_config


def test_versions_follow_the_policy(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path, versions=(1, 2, 3))
    model_dir = repo / "classifier"
    (model_dir / "04").mkdir()  # leading zero: not a version
    (model_dir / "notes").mkdir()
    (model_dir / "7").mkdir()  # no model.onnx yet: incomplete

    def served() -> list[int]:
        return [v.version for v in read_model(repo, "classifier", parse_model_config).versions]

    assert served() == [3]
    config = model_dir / "config.pbtxt"
    original = config.read_text()
    config.write_text(original + "version_policy { latest { num_versions: 2 } }\n")
    assert served() == [2, 3]
    config.write_text(original + "version_policy { specific { versions: [1, 3, 9] } }\n")
    assert served() == [1, 3]
    config.write_text(original + "version_policy { all {} }\n")
    assert served() == [1, 2, 3]


def test_metadata_from_model_json(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path)
    source = read_model(repo, "classifier", parse_model_config).versions[0]
    metadata = read_metadata(source, {})
    assert metadata is not None and metadata.preprocessing is not None
    assert metadata.labels == ("class_0", "class_1", "class_2", "class_3")
    assert metadata.preprocessing.input_size == (32, 32)
    assert metadata.preprocessing.resize_size == 36


def test_metadata_from_onnx_props_when_no_model_json(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path)
    source = read_model(repo, "classifier", parse_model_config).versions[0]
    document = json.loads((source.directory / "model.json").read_text())
    (source.directory / "model.json").unlink()
    props = {key: json.dumps(value) for key, value in document.items()}
    metadata = read_metadata(source, props)
    assert metadata is not None and metadata.preprocessing is not None
    assert metadata.preprocessing.mean == tuple(document["mean"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": "class_0"}, "labels must be a list of strings"),
        ({"abstention": {"threshold": 2.0}}, r"abstention\.threshold 2\.0 is not in"),
        ({"calibration": {"temperature": 0}}, r"calibration\.temperature 0\.0 is not a positive"),
    ],
)
def test_a_malformed_model_json_names_the_file_and_the_key(
    tmp_path: Path, change: dict, message: str
) -> None:
    repo = make_model_repository(tmp_path)
    source = read_model(repo, "classifier", parse_model_config).versions[0]
    path = source.directory / "model.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(ModelLoadError, match=message) as raised:
        read_metadata(source, {})
    assert str(raised.value).startswith(f"{path}: ")
    path.unlink()  # the same document in the graph's metadata_props is read by the same rule
    props = {key: json.dumps(value) for key, value in change.items()}
    props["input_size"] = "[32, 32]"
    with pytest.raises(ModelLoadError, match="metadata_props: .*" + message):
        read_metadata(source, props)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name: "other"\n', "differs from its directory"),
        ('platform: "tensorflow_savedmodel"\n', "not onnxruntime_onnx"),
        ("max_batch_size: [\n", "config.pbtxt"),
    ],
)
def test_broken_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    repo = make_model_repository(tmp_path)
    (repo / "classifier" / "config.pbtxt").write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        read_model(repo, "classifier", parse_model_config)


def test_list_models_and_missing_repository(tmp_path: Path) -> None:
    repo = make_model_repository(tmp_path / "models")
    write_version(repo / "classifier", 2)
    (repo / ".hidden").mkdir()
    assert list_models(repo) == ["classifier"]
    with pytest.raises(ModelLoadError, match="not a directory"):
        list_models(tmp_path / "absent")
