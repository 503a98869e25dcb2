"""Builds small, real model repositories for server and client tests, without torch.

``make_model_repository(path)`` writes the layout the exporter produces (see
docs/architecture.md): config.pbtxt, labels.txt, and per version model.onnx + model.json. The
ONNX graph follows the export contract: input ``image`` UINT8 [-1, H, W, 3] -> Cast -> scale
and normalise -> NHWC->NCHW -> (optional slow convolutions) -> global average pool -> Gemm ->
``logits`` and Softmax -> ``probabilities``, FP32 [-1, C]. Weights depend on the version
number, so tests can tell versions apart by their outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from golden_set_factory import write_golden_set
from onnx import TensorProto, helper, numpy_helper

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def build_classifier_onnx(  # noqa: PLR0913  each keyword is one property of the generated graph
    *,
    num_classes: int = 4,
    input_size: tuple[int, int] = (32, 32),
    seed: int = 1,
    slow_layers: int = 0,
    labels: Sequence[str] | None = None,
    input_format: str = "uint8-nhwc",
    weight_mib: float = 0.0,
) -> onnx.ModelProto:
    """A tiny classifier graph following the export contract.

    Args:
        slow_layers: 3x3 128-channel convolutions added before pooling, to make compute take
            measurable time (deadline, queue and drain tests). Their output is scaled to
            almost nothing, so the predictions stay the same.
        weight_mib: a square FP32 matrix of about this size multiplied into the pooled
            features, so that a loaded version holds that much memory (a leaked version shows
            in the server's RSS). Its output, too, is scaled to almost nothing.
    """
    rng = np.random.default_rng(seed)
    height, width = input_size
    weight = rng.normal(0, 4.0, size=(3, num_classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=(num_classes,)).astype(np.float32)
    if input_format == "float32-nchw":
        return _float_classifier(weight, bias, input_size, labels)
    initializers = [
        numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
        numpy_helper.from_array(np.array(MEAN, np.float32).reshape(1, 1, 1, 3), "mean"),
        numpy_helper.from_array(np.array(STD, np.float32).reshape(1, 1, 1, 3), "std"),
        numpy_helper.from_array(weight, "fc_weight"),
        numpy_helper.from_array(bias, "fc_bias"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["image_f", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normalised"]),
        helper.make_node("Transpose", ["normalised"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
    ]
    if slow_layers:
        nodes[-1] = helper.make_node("Flatten", ["pooled"], ["features_main"], axis=1)
        channels = 128
        previous = "nchw"
        for index in range(slow_layers):
            in_channels = 3 if index == 0 else channels
            kernel = rng.normal(0, 0.05, size=(channels, in_channels, 3, 3)).astype(np.float32)
            initializers.append(numpy_helper.from_array(kernel, f"slow_w{index}"))
            nodes.append(
                helper.make_node(
                    "Conv", [previous, f"slow_w{index}"], [f"slow{index}"], pads=[1, 1, 1, 1]
                )
            )
            previous = f"slow{index}"
        initializers.append(numpy_helper.from_array(np.array(1e-12, np.float32), "tiny"))
        nodes += [
            helper.make_node("ReduceMean", [previous], ["slow_mean"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Mul", ["slow_mean", "tiny"], ["slow_scaled"]),
            helper.make_node("Unsqueeze", ["slow_scaled", "one_axis"], ["slow_column"]),
            helper.make_node("Add", ["features_main", "slow_column"], ["features"]),
        ]
        initializers.append(numpy_helper.from_array(np.array([1], np.int64), "one_axis"))
    if weight_mib:
        _add_weight_ballast(nodes, initializers, rng, weight_mib)
    nodes += [
        helper.make_node("Gemm", ["features", "fc_weight", "fc_bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", height, width, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", num_classes]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if labels is not None:
        helper.set_model_props(model, {"labels": json.dumps(list(labels))})
    onnx.checker.check_model(model)
    return model


def _add_weight_ballast(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    rng: np.random.Generator,
    mib: float,
) -> None:
    """features [N, 3] -> [N, side] -> x [side, side] matrix -> mean * 1e-12, added back."""
    side = max(1, int((mib * 1024 * 1024 / 4) ** 0.5))
    nodes[-1].output[0] = "features_before_ballast"
    initializers += [
        numpy_helper.from_array(rng.normal(0, 0.1, (3, side)).astype(np.float32), "ballast_in"),
        numpy_helper.from_array(rng.normal(0, 0.1, (side, side)).astype(np.float32), "ballast"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "ballast_scale"),
    ]
    nodes += [
        helper.make_node("MatMul", ["features_before_ballast", "ballast_in"], ["ballast_wide"]),
        helper.make_node("MatMul", ["ballast_wide", "ballast"], ["ballast_out"]),
        helper.make_node("ReduceMean", ["ballast_out"], ["ballast_mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["ballast_mean", "ballast_scale"], ["ballast_scaled"]),
        helper.make_node("Add", ["features_before_ballast", "ballast_scaled"], ["features"]),
    ]


def _float_classifier(
    weight: np.ndarray,
    bias: np.ndarray,
    input_size: tuple[int, int],
    labels: Sequence[str] | None,
) -> onnx.ModelProto:
    """The ``float32-nchw`` variant: normalised input [-1, 3, H, W] -> pool -> Gemm."""
    height, width = input_size
    num_classes = weight.shape[1]
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "fc_weight", "fc_bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_float_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, height, width])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", num_classes]),
        ],
        [numpy_helper.from_array(weight, "fc_weight"), numpy_helper.from_array(bias, "fc_bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if labels is not None:
        helper.set_model_props(model, {"labels": json.dumps(list(labels))})
    onnx.checker.check_model(model)
    return model


def config_pbtxt(  # noqa: PLR0913  each keyword is one field of the generated config.pbtxt
    name: str,
    *,
    num_classes: int,
    input_size: tuple[int, int],
    max_batch_size: int = 16,
    max_queue_delay_us: int = 2000,
    extra: str = "",
    input_format: str = "uint8-nhwc",
) -> str:
    """The config.pbtxt the exporter writes for a classifier of ``input_format``."""
    height, width = input_size
    if input_format == "float32-nchw":
        image = f"data_type: TYPE_FP32\n    format: FORMAT_NCHW\n    dims: [ 3, {height}, {width} ]"
    else:
        image = (
            f"data_type: TYPE_UINT8\n    format: FORMAT_NHWC\n    dims: [ {height}, {width}, 3 ]"
        )
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
        f'input [\n  {{\n    name: "image"\n    {image}\n  }}\n]\n'
        f'output [\n  {{\n    name: "logits"\n    data_type: TYPE_FP32\n'
        f"    dims: [ {num_classes} ]\n  }},\n"
        f'  {{\n    name: "probabilities"\n    data_type: TYPE_FP32\n'
        f'    dims: [ {num_classes} ]\n    label_filename: "labels.txt"\n  }}\n]\n'
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
        f"{extra}"
    )


def model_json(labels: Sequence[str], input_size: tuple[int, int], resize_size: int) -> dict:
    """model.json as the exporter writes it (provenance fields filled with test values)."""
    return {
        "labels": list(labels),
        "input_format": "uint8-nhwc",
        "input_size": list(input_size),
        "resize_size": resize_size,
        "mean": list(MEAN),
        "std": list(STD),
        "precision": "fp32",
        "arch": "tiny-test",
        "weights": "none",
        "training": {"best_val_accuracy": None, "epochs": {"head": 0, "finetune": 0}},
        "dataset_fingerprint": None,
        "parity": {"max_abs_diff_logits": 0.0, "tolerance": 1e-4, "batch_sizes": [1, 2]},
        "exporter": "onnx.helper",
        "versions": {"onnx": onnx.__version__},
        "git_commit": None,
        "created_at": "2026-01-01T00:00:00Z",
    }


def write_version(  # noqa: PLR0913  each keyword is one property of the generated version
    model_dir: Path,
    version: int,
    *,
    num_classes: int = 4,
    input_size: tuple[int, int] = (32, 32),
    resize_size: int | None = None,
    slow_layers: int = 0,
    corrupt: bool = False,
    golden: bool = True,
    input_format: str = "uint8-nhwc",
    weight_mib: float = 0.0,
) -> Path:
    """Stage one version directory and rename it into place, as the exporter does.

    With ``golden`` (and a loadable model) the version carries a golden set whose expected
    probabilities come from a reference path independent of the server's decoder (see
    ``golden_set_factory``), so the server's load-time check runs in every test that loads it.
    """
    labels = [f"class_{i}" for i in range(num_classes)]
    staging = model_dir / f".staging-{version}-{os.getpid()}"
    staging.mkdir(parents=True)
    resize = resize_size or int(max(input_size) * 8 / 7)
    document = model_json(labels, input_size, resize)
    document["input_format"] = input_format
    if corrupt:
        (staging / "model.onnx").write_bytes(b"this is not an onnx model")
    else:
        model = build_classifier_onnx(
            num_classes=num_classes,
            input_size=input_size,
            seed=version,
            slow_layers=slow_layers,
            input_format=input_format,
            weight_mib=weight_mib,
        )
        onnx.save(model, str(staging / "model.onnx"))
        if golden:
            write_golden_set(staging, model, document)
    (staging / "model.json").write_text(json.dumps(document))
    target = model_dir / str(version)
    os.rename(staging, target)
    return target


def make_model_repository(  # noqa: PLR0913  each keyword is one property of the generated repository
    path: Path,
    *,
    name: str = "classifier",
    versions: Sequence[int] = (1,),
    num_classes: int = 4,
    input_size: tuple[int, int] = (32, 32),
    max_batch_size: int = 16,
    max_queue_delay_us: int = 2000,
    slow_layers: int = 0,
    config_extra: str = "",
    input_format: str = "uint8-nhwc",
) -> Path:
    """Write a model repository with one model and the given versions; returns the repo path.

    Example:
        repo = make_model_repository(tmp_path / "models", versions=(1, 2), num_classes=3)
        # repo/classifier/{config.pbtxt,labels.txt,1/model.onnx,1/model.json,2/...}
    """
    model_dir = path / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(
        config_pbtxt(
            name,
            num_classes=num_classes,
            input_size=input_size,
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            extra=config_extra,
            input_format=input_format,
        )
    )
    (model_dir / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(num_classes)))
    for version in versions:
        write_version(
            model_dir,
            version,
            num_classes=num_classes,
            input_size=input_size,
            slow_layers=slow_layers,
            input_format=input_format,
        )
    return path


def write_failing_version(version_dir: Path) -> None:
    """Loads fine, fails when run: Reshape to [7, -1] cannot split 32*32*3 elements."""
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f", "shape"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "fails",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 32, 32, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, None),
        ],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [7, -1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    staging = version_dir.parent / f".staging-{version_dir.name}"
    staging.mkdir()
    onnx.save(model, str(staging / "model.onnx"))
    staging.rename(version_dir)
