"""Phase 1 freezes the backbone for real; phase 2 LRs and gradual unfreezing follow the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from trainer_helpers import make_image_folder, tiny_config

from trainer.checkpoint import PhaseStats, Progress
from trainer.finetune.phase_runner import record_val_accuracy
from trainer.finetune.phases import (
    build_optimizer,
    build_phases,
    build_scheduler,
    set_trainable,
    train_mode,
    warmup_cosine,
)
from trainer.model.classifier import create_model
from trainer.model.layer_groups import group_parameters, layer_groups
from trainer.run import train


def _pretrained_like(path: Path, num_classes: int = 10) -> dict[str, torch.Tensor]:
    """A resnet18 state dict with non-trivial BatchNorm statistics, saved to ``path``."""
    torch.manual_seed(1)
    model = create_model("resnet18", num_classes)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.copy_(torch.randn_like(value) * 0.1)
        elif key.endswith("running_var"):
            value.copy_(torch.rand_like(value) + 0.5)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("streamed", [False, True], ids=["probe-on-cached-features", "streamed"])
def test_phase1_leaves_the_backbone_bit_identical(
    image_folder: Path, tmp_path: Path, streamed: bool
) -> None:
    source = _pretrained_like(tmp_path / "pretrained.pt")
    config = tiny_config(
        image_folder,
        tmp_path / "out",
        weights=str(tmp_path / "pretrained.pt"),
        head_epochs=1,
        finetune_epochs=0,
        batch_size=8,
        feature_cache_mb=0 if streamed else 64,
        feature_views=1,
    )
    train(config)
    checkpoint = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)
    state = checkpoint["model_state"]
    backbone = [k for k in source if not k.startswith("fc.")]
    assert any(k.endswith("running_var") for k in backbone)
    for key in backbone:  # parameters and BatchNorm buffers, num_batches_tracked included
        assert torch.equal(state[key], source[key]), key
    assert not torch.equal(state["fc.weight"][:3], source["fc.weight"][:3])
    assert checkpoint["phase"] == "head" and checkpoint["epochs"] == {"head": 1, "finetune": 0}
    if not streamed:
        return
    groups = checkpoint["optimizer_state"]["param_groups"]
    assert {g["group"] for g in groups} == {"head"}
    assert sum(len(g["params"]) for g in groups) == 2  # fc.weight and fc.bias only
    assert checkpoint["phase"] == "head" and checkpoint["epochs"] == {"head": 1, "finetune": 0}


def test_frozen_backbone_builds_no_autograd_graph() -> None:
    model = create_model("resnet18", 3)
    groups = layer_groups(model, "resnet18")
    set_trainable(model, groups, ("head",))
    train_mode(model, groups, ("head",), freeze_bn=False)
    seen: list[torch.Tensor] = []
    model.fc.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    out = model(torch.randn(2, 3, 32, 32))
    assert seen[0].grad_fn is None and not seen[0].requires_grad
    assert out.grad_fn is not None


def test_train_mode_keeps_batchnorm_of_frozen_groups_in_eval() -> None:
    model = create_model("resnet18", 3)
    groups = layer_groups(model, "resnet18")
    train_mode(model, groups, ("head", "layer4"), freeze_bn=False)
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.training == name.startswith("layer4"), name
    train_mode(model, groups, ("head", "layer4"), freeze_bn=True)
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_optimizer_holds_only_trainable_params_and_no_decay_on_norms() -> None:
    model = create_model("resnet18", 3)
    groups = layer_groups(model, "resnet18")
    trainable = ("head", "layer4")
    set_trainable(model, groups, trainable)
    optimizer = build_optimizer(model, groups, trainable, {"head": 1e-3, "layer4": 1e-4}, 0.05)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    expected = {id(p) for g in groups if g.name in trainable for _, p in group_parameters(model, g)}
    assert in_optimizer == expected
    for group in optimizer.param_groups:
        assert (group["weight_decay"] == 0.0) == all(p.ndim <= 1 for p in group["params"])


def test_phase2_learning_rates_follow_the_schedule() -> None:
    model = create_model("resnet18", 3)
    groups = layer_groups(model, "resnet18")
    phases = build_phases(
        [g.name for g in groups],
        head_epochs=2,
        finetune_epochs=3,
        policy="top:2",
        lr=1e-4,
        head_lr=1e-3,
        lr_decay=0.3,
        freeze_bn=False,
    )
    finetune = phases[1]
    assert finetune.trainable_groups == ("head", "layer4", "layer3")
    assert finetune.lrs == pytest.approx({"head": 1e-3, "layer4": 1e-4, "layer3": 3e-5})
    set_trainable(model, groups, finetune.trainable_groups)
    optimizer = build_optimizer(model, groups, finetune.trainable_groups, finetune.lrs, 0.05)
    total = 20
    scheduler = build_scheduler(optimizer, total, warmup_fraction=0.1)
    factor = warmup_cosine(total, 0.1)
    for step in range(total):
        for group in optimizer.param_groups:
            expected = finetune.lrs[group["group"]] * factor(step)
            assert group["lr"] == pytest.approx(expected, rel=1e-9), (step, group["group"])
        optimizer.step()
        scheduler.step()
    assert factor(0) < factor(2) and factor(2) == pytest.approx(1.0)
    assert factor(total - 1) < 0.05


GRADUAL = {
    "resnet18": ["layer4", "layer3", "layer2"],
    "mobilenet_v3_small": ["stage4", "stage3", "stage2"],
    "efficientnet_b0": ["stage7", "stage6", "stage5"],
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(GRADUAL))
def test_gradual_unfreezing_in_a_real_run(arch: str, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), train_per_class=4)
    config = tiny_config(
        data, tmp_path / "out", arch=arch, finetune_epochs=3, unfreeze="gradual:1", patience=9
    )
    torch.manual_seed(0)
    initial = create_model(arch, 2).state_dict()  # same seed as the run: same random init
    train(config)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    order = GRADUAL[arch]
    assert [x["trainable_groups"] for x in lines] == [
        ["head", order[0]],
        ["head", order[0], order[1]],
        ["head", order[0], order[1], order[2]],
    ]
    assert [sorted(x["lrs"]) for x in lines] == [sorted(x["trainable_groups"]) for x in lines]
    state = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)
    model = create_model(arch, 2)
    groups = {g.name: g for g in layer_groups(model, arch)}
    frozen = [g for name, g in groups.items() if name not in (*order, "head")]
    for group in frozen:
        for key, _ in group_parameters(model, group):
            assert torch.equal(state["model_state"][key], initial[key]), key
    moved = [k for k, _ in group_parameters(model, groups[order[2]])]
    assert any(not torch.equal(state["model_state"][k], initial[k]) for k in moved)


def test_patience_counts_from_the_phases_own_best_not_the_probes() -> None:
    # The probe scored 0.90; phase 2's flat policy falls to 0.5 and climbs past it.
    progress, stats = Progress(best_val_accuracy=0.90), PhaseStats()
    waited, improved = [], []
    for accuracy in (0.50, 0.70, 0.65, 0.80, 0.92, 0.91):
        improved.append(record_val_accuracy(progress, stats, accuracy))
        waited.append(progress.epochs_since_best)
    # Climbing resets patience even below the probe; only 0.92 is a new best for best.pt.
    assert waited == [0, 0, 1, 0, 0, 1]
    assert improved == [False, False, False, False, True, False]
    assert (progress.best_val_accuracy, stats.best_val_accuracy) == (0.92, 0.92)
