"""The training view computes what the plain model computes, steps the same parameters the same
way, and leaves the model's state (and so the checkpoint and the export) as it was."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.finetune.frozen_prefix import (
    FrozenPrefixView,
    fold_batchnorm,
    forward_stages,
    prefix_channels_last,
    training_view,
)
from trainer.finetune.phases import build_optimizer, set_trainable, train_mode
from trainer.model.classifier import create_model, unwrap
from trainer.model.layer_groups import HEAD, LayerGroup, layer_groups

# (arch, input size): one per family of layer_groups, ViT at the only size it takes.
FAMILIES = [
    ("resnet18", 32),
    ("mobilenet_v3_small", 32),
    ("mobilenet_v2", 32),
    ("efficientnet_b0", 32),
    ("regnet_y_400mf", 32),
    ("convnext_tiny", 32),
    ("swin_t", 32),
    pytest.param("vit_b_16", 224, marks=pytest.mark.slow),
]


def _model(arch: str, num_classes: int = 3) -> tuple[nn.Module, list[LayerGroup]]:
    """``arch`` with BatchNorm statistics and affine terms far from their initial values, so a
    wrong fold shows."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
    return model, layer_groups(model, arch)


def _top(groups: list[LayerGroup], k: int = 1) -> tuple[str, ...]:
    body = [g.name for g in groups if g.name != HEAD]
    return (HEAD, *body[-k:])


@pytest.mark.parametrize(("arch", "size"), FAMILIES)
def test_view_logits_equal_the_plain_models(arch: str, size: int) -> None:
    model, groups = _model(arch)
    trainable = _top(groups)
    set_trainable(model, groups, trainable)
    view = training_view(model, arch, groups)
    assert isinstance(view, FrozenPrefixView)
    inputs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    model.eval()
    view.eval()
    with torch.no_grad():
        expected = model(inputs)
        got = view(inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_view_logits_equal_in_training_mode(arch: str) -> None:
    """As the phases train: frozen BatchNorm in eval, the trainable groups' in train mode."""
    model, groups = _model(arch)
    trainable = _top(groups, 2)
    set_trainable(model, groups, trainable)
    train_mode(model, groups, trainable, freeze_bn=False)
    twin = copy.deepcopy(model)  # the trainable groups' BatchNorm statistics move per forward
    view = training_view(twin, arch, groups)
    inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    outputs = []
    for module in (view, model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)  # the same dropout masks (MobileNetV3's head) on both sides
            outputs.append(module(inputs))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


def test_batchnorm_is_folded_out_of_the_prefix() -> None:
    model, groups = _model("resnet18")
    set_trainable(model, groups, _top(groups))
    view = training_view(model, "resnet18", groups)
    assert isinstance(view, FrozenPrefixView)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in view.prefix.modules())
    assert all(not p.requires_grad for p in view.prefix.parameters())
    # layer4 and the head are the model's own modules, not copies
    assert view.suffix[0] is model.layer4
    assert any(m is model.fc for m in view.suffix.modules())


def test_fold_leaves_batchnorm_in_train_mode_alone() -> None:
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert fold_batchnorm(block) == 0
    block.eval()
    assert fold_batchnorm(block) == 1
    assert isinstance(block[1], nn.Identity)


LR = 1e-2


def _one_step(
    module: nn.Module, model: nn.Module, groups: list[LayerGroup], trainable: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """One trainer step (AdamW of ``build_optimizer``) through ``module``: the update and the
    gradient of every parameter of ``model``."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, groups, trainable, dict.fromkeys(trainable, LR), 0.05)
    inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    labels = torch.tensor([0, 1, 2, 1])
    optimizer.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)  # the same stochastic-depth and dropout draws on both sides
        nn.functional.cross_entropy(module(inputs), labels).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, grads


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_one_step_through_the_view_updates_as_the_plain_model(arch: str) -> None:
    # float64, so that the fold's rounding stays far below the tolerances
    plain, groups = _model(arch)
    plain.double()
    trainable = _top(groups)
    set_trainable(plain, groups, trainable)
    train_mode(plain, groups, trainable, freeze_bn=False)
    viewed = copy.deepcopy(plain)
    expected, expected_grads = _one_step(plain, plain, groups, trainable)
    got, got_grads = _one_step(training_view(viewed, arch, groups), viewed, groups, trainable)
    moved = 0
    for name, update in expected.items():
        grad = expected_grads[name]
        if grad is None:
            assert got_grads[name] is None, name
            assert not update.any(), name
            continue
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-7, atol=1e-12, msg=name)
        # AdamW's first step is lr * g / (|g| + eps): near-zero gradients amplify rounding
        # by up to lr / eps, so the updates are compared to a millionth of lr... ten times.
        torch.testing.assert_close(got[name], update, rtol=0.0, atol=1e-5 * LR, msg=name)
        moved += 1
    assert moved == sum(p.requires_grad for p in plain.parameters()) > 0


def test_frozen_parameters_get_no_gradient() -> None:
    model, groups = _model("resnet18")
    trainable = _top(groups)
    set_trainable(model, groups, trainable)
    train_mode(model, groups, trainable, freeze_bn=False)
    view = training_view(model, "resnet18", groups)
    assert isinstance(view, FrozenPrefixView)
    view(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, param in model.named_parameters():
        trains = name.startswith(("layer4.", "fc."))
        assert (param.grad is not None) == trains, name
    assert all(p.grad is None for p in view.prefix.parameters())


def test_training_through_the_view_leaves_the_state_dict_as_the_checkpoint_knows_it() -> None:
    model, groups = _model("resnet18")
    keys = list(model.state_dict())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = _top(groups)
    set_trainable(model, groups, trainable)
    train_mode(model, groups, trainable, freeze_bn=False)
    view = training_view(model, "resnet18", groups)
    optimizer = build_optimizer(model, groups, trainable, dict.fromkeys(trainable, 1e-2), 0.0)
    for step in range(3):
        inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(view(inputs), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()
    state = model.state_dict()
    assert list(state) == keys
    for key, value in state.items():
        frozen = not key.startswith(("layer4.", "fc."))
        assert torch.equal(value, initial[key]) == frozen, key  # BN buffers of layer4 move too
    assert unwrap(view) is model
    assert not {id(p) for p in view.parameters()} & {
        id(p) for n, p in model.named_parameters() if not n.startswith(("layer4.", "fc."))
    }


def test_plain_model_when_nothing_is_frozen_or_the_family_is_unknown(caplog) -> None:
    model, groups = _model("resnet18")
    set_trainable(model, groups, tuple(g.name for g in groups))
    with caplog.at_level(logging.INFO, logger="trainer.finetune.frozen_prefix"):
        assert training_view(model, "resnet18", groups) is model
    assert "view=plain" in caplog.text
    torch.manual_seed(0)
    alexnet = create_model("alexnet", 3)
    alexnet_groups = layer_groups(alexnet, "alexnet")
    set_trainable(alexnet, alexnet_groups, (HEAD,))
    assert forward_stages(alexnet, "alexnet", alexnet_groups) is None
    assert training_view(alexnet, "alexnet", alexnet_groups) is alexnet


def test_prefix_channels_last_by_family_and_device() -> None:
    assert prefix_channels_last("resnet50", False, "cpu")
    assert prefix_channels_last("efficientnet_b0", False, "cpu")
    assert not prefix_channels_last("convnext_tiny", False, "cpu")
    assert not prefix_channels_last("resnet50", False, "cuda")
    assert prefix_channels_last("convnext_tiny", True, "cuda")


def test_channels_last_model_keeps_its_format_after_the_prefix() -> None:
    model, groups = _model("resnet18")
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    set_trainable(model, groups, _top(groups))
    view = training_view(model, "resnet18", groups, channels_last=True)
    seen: list[torch.Tensor] = []
    model.layer4.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    view(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_ddp_wraps_the_view(tmp_path: Path) -> None:
    """A real (one-process, gloo) DDP around the view: same step, unwrap reaches the model."""
    model, groups = _model("resnet18")
    model.double()
    trainable = _top(groups)
    set_trainable(model, groups, trainable)
    train_mode(model, groups, trainable, freeze_bn=False)
    plain = copy.deepcopy(model)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(training_view(model, "resnet18", groups))
        assert unwrap(wrapped) is model
        inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4)).double()
        labels = torch.tensor([0, 1, 2, 0])
        nn.functional.cross_entropy(wrapped(inputs), labels).backward()
        nn.functional.cross_entropy(plain(inputs), labels).backward()
    finally:
        dist.destroy_process_group()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-12, msg=name)


@pytest.mark.slow
def test_torch_compile_traces_the_view() -> None:
    model, groups = _model("resnet18")
    model.double()
    trainable = _top(groups)
    set_trainable(model, groups, trainable)
    train_mode(model, groups, trainable, freeze_bn=False)
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(training_view(model, "resnet18", groups), backend="aot_eager")
    assert unwrap(compiled) is model  # type: ignore[arg-type]
    inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)).double()
    out = compiled(inputs)
    torch.testing.assert_close(out, twin(inputs), rtol=1e-7, atol=1e-10)
    out.sum().backward()
    assert model.layer4[0].conv1.weight.grad is not None
    assert model.layer3[0].conv1.weight.grad is None
