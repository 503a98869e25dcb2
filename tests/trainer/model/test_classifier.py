"""create_model heads, layer groups per family, and starting weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import get_model

from contracts.preprocessing import IMAGENET_MEAN, Preprocessing
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError, WeightsUnavailable
from trainer.model.classifier import classifier_path, create_model, head_module_name, logits_dim
from trainer.model.layer_groups import HEAD, family, group_parameters, layer_groups
from trainer.model.weights import (
    StartingWeights,
    load_starting_weights,
    preprocessing_for,
    resolve_weights,
)

FAMILY_GROUPS = {
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "regnet_y_400mf": ["stem", "block1", "block2", "block3", "block4", "head"],
    "mobilenet_v3_small": ["stem", "stage1", "stage2", "stage3", "stage4", "head"],
    "efficientnet_b0": ["stem", *(f"stage{i}" for i in range(1, 8)), "head"],
    "convnext_tiny": ["stem", "stage1", "stage2", "stage3", "stage4", "head"],
    "vit_b_16": ["stem", *(f"block{i}" for i in range(12)), "head"],
}


@pytest.mark.parametrize("arch", sorted(FAMILY_GROUPS))
def test_layer_groups_partition_every_parameter(arch: str) -> None:
    model = create_model(arch, 3)
    groups = layer_groups(model, arch)
    assert [g.name for g in groups] == FAMILY_GROUPS[arch]
    counted = sum(p.numel() for g in groups for _, p in group_parameters(model, g))
    assert counted == sum(p.numel() for p in model.parameters())
    head = [p for _, p in group_parameters(model, groups[-1])]
    assert groups[-1].name == HEAD and logits_dim(model) == 3
    assert any(p.shape[0] == 3 for p in head)


def test_families_are_recognised() -> None:
    assert family("resnext50_32x4d") == "resnet"
    assert family("efficientnet_v2_s") == "efficientnet"
    assert family("densenet121") == "generic"


@pytest.mark.parametrize(
    ("arch", "path"),
    [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"), ("vit_b_16", "heads.head")],
)
def test_head_replaced_in_place(arch: str, path: str) -> None:
    model = create_model(arch, 5)
    assert classifier_path(model) == path
    assert isinstance(model.get_submodule(path), nn.Linear)
    assert model.get_submodule(path).out_features == 5


def test_hidden_head_with_dropout_runs() -> None:
    model = create_model("mobilenet_v3_small", 4, head_hidden=16, head_dropout=0.2)
    head = model.get_submodule(classifier_path(model))
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert head_module_name(model) == "classifier"
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet9000", "num_classes": 3}, "unknown architecture"),
        ({"arch": "resnet18", "num_classes": 1}, "at least 2"),
        ({"arch": "resnet18", "num_classes": 3, "head_dropout": 1.5}, "head_dropout"),
        ({"arch": "squeezenet1_0", "num_classes": 3}, "no Linear classifier"),
    ],
)
def test_create_model_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_model(**kwargs)


def test_state_dict_path_with_other_class_count_drops_only_the_head(tmp_path: Path) -> None:
    source = create_model("resnet18", 10)
    path = tmp_path / "source.pt"
    torch.save(source.state_dict(), path)
    target = create_model("resnet18", 3)
    fresh_head = target.fc.weight.clone()
    weights = resolve_weights("resnet18", str(path))
    dropped = load_starting_weights(target, weights)
    assert dropped == ["fc.bias", "fc.weight"]
    assert torch.equal(target.fc.weight, fresh_head)
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(target.state_dict()[key], value), key
    # No metadata in a bare state dict: ImageNet statistics and a 0.875 crop.
    pre = preprocessing_for(weights, 64)
    assert pre.input_size == (64, 64) and pre.resize_size == 73 and pre.mean == IMAGENET_MEAN


def test_trainer_checkpoint_path_uses_ema_weights_and_preprocessing(tmp_path: Path) -> None:
    source = create_model("resnet18", 4)
    ema = create_model("resnet18", 4)
    path = tmp_path / "best.pt"
    header = ckpt.CheckpointHeader(
        arch="resnet18",
        classes=("a", "b", "c", "d"),
        head=ckpt.HeadSpec(),
        preprocessing=Preprocessing((48, 48), 60, (0.5,) * 3, (0.25,) * 3),  # type: ignore[arg-type]
        weights="none",
        dataset_fingerprint={},
        config={},
    )
    written = ckpt.Checkpoint(
        header,
        ckpt.Position(ckpt.PHASE_ORDER["finetune"], 1, ckpt.EPOCH_DONE),
        ckpt.Progress(),
        model_state=source.state_dict(),
        ema_state=ema.state_dict(),
    )
    path.write_bytes(ckpt.serialize(written))
    target = create_model("resnet18", 4)
    weights = resolve_weights("resnet18", str(path))
    assert load_starting_weights(target, weights) == []
    assert torch.equal(target.conv1.weight, ema.conv1.weight)
    assert preprocessing_for(weights, None).resize_size == 60
    assert preprocessing_for(weights, 32).resize_size == 40
    with pytest.raises(ConfigError, match="resnet18 checkpoint but --arch is resnet34"):
        resolve_weights("resnet34", str(path))


def test_mismatch_outside_the_head_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pt"
    torch.save(get_model("resnet34").state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit"):
        load_starting_weights(create_model("resnet18", 3), resolve_weights("resnet18", str(path)))


def test_missing_weights_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        resolve_weights("resnet18", str(tmp_path / "nope.pt"))


def test_unknown_weights_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        resolve_weights("resnet18", "IMAGENET9K")


def test_no_weights_means_no_state() -> None:
    assert resolve_weights("resnet18", "none") == StartingWeights("none", None, None)
