"""The training-time view of a model whose lower layer groups are frozen.

While only the top layer groups train (phase 1 when it streams, phase 2 with ``top:K`` or
``gradual:N``), the groups below the lowest trainable one, the frozen prefix, only ever run
forward: their parameters have ``requires_grad=False`` and their BatchNorm layers are in eval
mode (``phases.train_mode``). ``training_view`` builds a module that computes the same
function faster:

- a copy of the frozen prefix, run under ``torch.no_grad``, with every BatchNorm folded into
  the convolution that feeds it (exact up to float rounding: an eval-mode BatchNorm is one
  affine map per channel), so a ResNet's prefix runs half as many operators;
- then the model's own modules from the lowest trainable group up (shared, not copied), so the
  optimizer steps the original parameters and the checkpoint, the EMA and the export never see
  the view.

The copy is taken from the current weights, so a view is valid only while the trainable groups
stay as they are; the phase runner builds a new one at each phase entry and each unfreeze.
``torch.inference_mode`` would save a little more, but its outputs cannot be saved for the
backward pass of the trainable groups that read them, so the prefix runs under ``no_grad``.

A model's forward is cut along the stage boundaries of ``layer_groups``, family by family, by
re-chaining the model's own submodules the way its torchvision ``forward`` chains them. For the
generic family (any other torchvision model) the chain is unknown and the plain model trains;
so does a model whose groups are all trainable (nothing frozen to fold).
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck

from trainer.model.classifier import head_module_name
from trainer.model.layer_groups import HEAD, LayerGroup, family
from trainer.progress import log_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A run of the model's forward that belongs to one layer group."""

    group: str
    module: nn.Module


class FrozenPrefixView(nn.Module):
    """``suffix(prefix(x))``: the folded frozen prefix without autograd, then the trained model's
    own trainable modules.

    ``train()``/``eval()`` switch the prefix copy only (its BatchNorm stays in eval); the
    suffix's modules belong to ``trained_module``, whose modes ``phases.train_mode`` sets.
    """

    def __init__(
        self,
        trained_module: nn.Module,
        prefix: nn.Module,
        suffix: nn.Module,
        prefix_format: torch.memory_format,
        suffix_format: torch.memory_format,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.suffix = suffix
        self.prefix_format = prefix_format
        self.suffix_format = suffix_format
        # Kept out of the registered submodules: the view's train(), parameters() and state
        # must not reach the frozen groups of the model a second time. ``classifier.unwrap``
        # follows this attribute (the EMA averages the trained module).
        self.__dict__["trained_module"] = trained_module
        self.train(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.prefix(x.contiguous(memory_format=self.prefix_format))
        # In the model's own format: a convolution whose input and weight formats differ
        # copies its weight (forward and backward) and its gradient, every step.
        return self.suffix(x.contiguous(memory_format=self.suffix_format))

    def train(self, mode: bool = True) -> FrozenPrefixView:
        self.training = mode
        self.prefix.train(mode)
        _batchnorm_to_eval(self.prefix)
        return self


def training_view(
    model: nn.Module,
    arch: str,
    groups: list[LayerGroup],
    *,
    channels_last: bool = False,
) -> nn.Module:
    """The module to train ``model`` through: a ``FrozenPrefixView`` when it has a frozen
    prefix, else ``model`` itself. The choice is logged (``event=training_view``).

    Args:
        model: the trained model, with ``requires_grad`` already set for the phase
            (``phases.set_trainable``); the prefix is every leading group, in forward order,
            none of whose parameters requires a gradient.
        arch: the architecture name (its family says how the forward chains).
        groups: ``layer_groups(model, arch)``.
        channels_last: whether ``model`` (its parameters and its input) is channels_last;
            the prefix copy's own format is ``prefix_channels_last``'s choice.
    """
    stages = forward_stages(model, arch, groups)
    if stages is None:
        log_event(
            log,
            "training_view",
            view="plain",
            reason=f"{family(arch)} family: the forward is not split into layer groups",
        )
        return model
    frozen = _frozen_group_names(model, groups)
    cut = 0
    while cut < len(stages) and stages[cut].group in frozen:
        cut += 1
    if cut == 0:
        log_event(log, "training_view", view="plain", reason="no frozen layer group below")
        return model
    prefix = copy.deepcopy(nn.Sequential(*(s.module for s in stages[:cut])))
    # Frozen groups' BatchNorm is in eval whenever they train (phases.train_mode), whatever
    # mode the model was left in (evaluation, the feature cache) when the view is built.
    _batchnorm_to_eval(prefix)
    folded = fold_batchnorm(prefix)
    prefix.requires_grad_(False)
    device = next(model.parameters()).device
    in_channels_last = prefix_channels_last(arch, channels_last, device.type)
    prefix_format = torch.channels_last if in_channels_last else torch.contiguous_format
    prefix.to(memory_format=prefix_format)  # type: ignore[call-overload]
    suffix = nn.Sequential(*(s.module for s in stages[cut:]))
    log_event(
        log,
        "training_view",
        view="frozen_prefix",
        frozen_prefix=",".join(dict.fromkeys(s.group for s in stages[:cut])),
        folded_batchnorms=folded,
        prefix_channels_last=in_channels_last,
    )
    suffix_format = torch.channels_last if channels_last else torch.contiguous_format
    return FrozenPrefixView(model, prefix, suffix, prefix_format, suffix_format)


# Families whose frozen prefix is convolutions with BatchNorm. On the development CPU
# (AVX-512 with bf16, no AMX) their folded prefix ran 1.16-1.45x faster in channels_last than
# in NCHW under bf16 autocast, 1.12-1.56x in fp32 (resnet18, resnet50, mobilenet_v2,
# mobilenet_v3_small, efficientnet_b0, regnet_y_400mf at 64 and 160 px); ConvNeXt measured no
# gain (0.95-1.07x), nor Swin under bf16 (0.95x), and ViT has one convolution
# (docs/benchmarks.md, "Training throughput"). Only the prefix changes format:
# trainable parameters in channels_last made every fused AdamW step and convolution backward
# copy them (a phase-2 step of resnet18 was 10% slower than with the prefix alone converted).
_CHANNELS_LAST_PREFIX_ON_CPU = frozenset({"resnet", "regnet", "efficientnet", "mobilenet"})


def prefix_channels_last(arch: str, channels_last: bool, device_type: str) -> bool:
    """Whether the frozen prefix runs in channels_last: always when the model does, and on CPU
    for the families where it measured faster (``_CHANNELS_LAST_PREFIX_ON_CPU``). A fixed rule
    rather than a timing at start, so a resumed run computes exactly as the run it continues."""
    if channels_last:
        return True
    return device_type == "cpu" and family(arch) in _CHANNELS_LAST_PREFIX_ON_CPU


def forward_stages(model: nn.Module, arch: str, groups: list[LayerGroup]) -> list[Stage] | None:
    """The model's forward as a chain of its own submodules, one stage per layer group, head
    last; ``nn.Sequential(*stages)`` computes what ``model`` computes. None for the generic
    family, or when the stages would miss or repeat a parameter or buffer of the model."""
    kind = family(arch)
    head = model.get_submodule(head_module_name(model))
    tail = _tail(model, kind, head)
    if tail is None:
        return None
    stages = [Stage(g.name, _group_module(model, kind, g)) for g in groups if g.name != HEAD]
    stages.append(Stage(HEAD, tail))
    if not _covers_model(model, stages):
        log.warning("training view: the %s stages do not cover %s; plain model", kind, arch)
        return None
    return stages


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm2d that reads a Conv2d's output alone into that convolution, in
    place: consecutive children of an ``nn.Sequential``, and ``convK -> bnK`` in torchvision's
    ResNet blocks. The BatchNorm layers must be in eval mode to be folded; the folded ones are
    replaced by ``nn.Identity``. Returns how many were folded."""
    count = 0
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            pairs = list(itertools.pairwise(names))
        elif type(parent) in (BasicBlock, Bottleneck):
            pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(parent, f"bn{i}")]
        else:
            continue
        for conv_name, bn_name in pairs:
            count += _fold_pair(parent, conv_name, bn_name)
    return count


def _fold_pair(parent: nn.Module, conv_name: str, bn_name: str) -> int:
    conv, bn = parent._modules[conv_name], parent._modules[bn_name]
    if not (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
    ):
        return 0
    was_training = conv.training
    parent._modules[conv_name] = fuse_conv_bn_eval(conv.eval(), bn).train(was_training)
    parent._modules[bn_name] = nn.Identity()
    return 1


def _batchnorm_to_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _frozen_group_names(model: nn.Module, groups: list[LayerGroup]) -> set[str]:
    trainable = {
        g.name
        for g in groups
        for name, p in model.named_parameters()
        if p.requires_grad and g.owns(name)
    }
    return {g.name for g in groups} - trainable


# ---- how each family's forward chains its submodules ---------------------------------------


def _group_module(model: nn.Module, kind: str, group: LayerGroup) -> nn.Module:
    if kind == "resnet" and group.name == "stem":
        return _chain(model, "conv1", "bn1", "relu", "maxpool")
    if kind == "vit" and group.name == "stem":
        return _VitStem(model)
    if len(group.prefixes) == 1:
        return model.get_submodule(group.prefixes[0])
    return _chain(model, *group.prefixes)


def _tail(model: nn.Module, kind: str, head: nn.Module) -> nn.Module | None:
    """From the last body group's output to the logits (pooling, flattening, the head)."""
    if kind in ("resnet", "regnet", "efficientnet"):
        return nn.Sequential(model.get_submodule("avgpool"), nn.Flatten(1), head)
    if kind == "mobilenet":
        # MobileNetV3 has an avgpool module; V2 pools with the functional form.
        pool = (
            model.get_submodule("avgpool")
            if hasattr(model, "avgpool")
            else nn.AdaptiveAvgPool2d((1, 1))
        )
        return nn.Sequential(pool, nn.Flatten(1), head)
    if kind == "convnext":
        return nn.Sequential(model.get_submodule("avgpool"), head)
    if kind == "swin":
        return nn.Sequential(*_chain(model, "permute", "avgpool", "flatten"), head)
    if kind == "vit":
        return nn.Sequential(_ClassToken(), head)
    return None


class _VitStem(nn.Module):
    """torchvision ViT's forward up to the encoder blocks: patch projection, class token,
    position embedding, dropout (the model's own modules and parameters)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.conv_proj = vit.get_submodule("conv_proj")
        self.class_token = vit.get_parameter("class_token")
        self.pos_embedding = vit.get_parameter("encoder.pos_embedding")
        self.dropout = vit.get_submodule("encoder.dropout")
        self.hidden_dim: int = getattr(vit, "hidden_dim")  # noqa: B009  a plain int, typed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


def _chain(model: nn.Module, *paths: str) -> nn.Sequential:
    return nn.Sequential(*(model.get_submodule(p) for p in paths))


class _ClassToken(nn.Module):
    """The class token's output: what torchvision's ViT feeds its head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def _covers_model(model: nn.Module, stages: list[Stage]) -> bool:
    """Whether the stages hold every parameter and buffer of ``model`` exactly once."""
    held_params = [id(p) for s in stages for p in s.module.parameters()]
    held_buffers = [id(b) for s in stages for b in s.module.buffers()]
    return sorted(held_params) == sorted(id(p) for p in model.parameters()) and sorted(
        held_buffers
    ) == sorted(id(b) for b in model.buffers())
