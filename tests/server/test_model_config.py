"""config.pbtxt <-> the plain ModelSpec: what the server reads is what ModelConfig reports."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from protocol.inference import model_config_pb2
from server.model_spec import DynamicBatchingConfig, TensorConfig, VersionPolicy
from server.transport.model_config import (
    ModelConfigError,
    model_config_to_proto,
    parse_model_config,
)

TEXT = """
name: "classifier"
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy { specific { versions: [1, 3] } }
input [ { name: "image" data_type: TYPE_UINT8 format: FORMAT_NHWC dims: [ 32, 32, 3 ] } ]
output [
  { name: "logits" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "probabilities" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 2000
  default_queue_policy { max_queue_size: 64 }
}
"""


def test_spec_is_plain_data() -> None:
    spec = parse_model_config(TEXT)
    assert spec.max_batch_size == 16
    assert spec.inputs == (TensorConfig("image", "UINT8", (32, 32, 3), format="FORMAT_NHWC"),)
    assert spec.outputs[1] == TensorConfig(
        "probabilities", "FP32", (4,), label_filename="labels.txt"
    )
    assert spec.label_filenames == ("labels.txt",)
    assert spec.dynamic_batching == DynamicBatchingConfig(2000, (4, 8), False, 64)
    assert spec.version_policy == VersionPolicy("specific", versions=(1, 3))
    assert spec.version_policy.select([1, 2, 3, 4]) == [1, 3]


def test_model_config_reports_what_the_file_says() -> None:
    written = model_config_to_proto(parse_model_config(TEXT))
    original = text_format.Parse(TEXT, model_config_pb2.ModelConfig())
    assert written == original


@pytest.mark.parametrize(
    ("policy", "available", "selected"),
    [
        ("", [1, 2, 3], [3]),
        ("version_policy { latest { num_versions: 2 } }", [1, 2, 3], [2, 3]),
        ("version_policy { all {} }", [3, 1], [1, 3]),
    ],
)
def test_version_policies(policy: str, available: list[int], selected: list[int]) -> None:
    assert parse_model_config(policy).version_policy.select(available) == selected


def test_unparsable_text_is_a_config_error() -> None:
    with pytest.raises(ModelConfigError):
        parse_model_config("max_batch_size: [\n")
