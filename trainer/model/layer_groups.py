"""Layer groups: an architecture cut into ordered blocks, from the stem to the head.

Phases unfreeze groups from the top, and discriminative learning rates decay with a group's
depth below the head, so each family is cut at its natural stage boundaries:

| family | groups (stem -> head) |
|---|---|
| ResNet, ResNeXt, Wide ResNet | stem (conv1, bn1), layer1, layer2, layer3, layer4, head (fc) |
| RegNet | stem, block1 .. block4, head (fc) |
| EfficientNet (v1, v2) | stem (features.0), stage1 .. stageN (the last with the 1x1 conv), head |
| MobileNetV2/V3 | stem, one stage per stride-2 block (the last with the 1x1 conv), head |
| ConvNeXt, Swin | stem, stage1 .. stage4 (each with the downsampling before it), head |
| ViT | stem (patch projection, class token, position embedding), block0 .. blockN, head |
| anything else | one group per top-level child, head last |

Every parameter belongs to exactly one group; ``layer_groups`` checks that.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from trainer.model.classifier import head_module_name

HEAD = "head"


@dataclass(frozen=True)
class LayerGroup:
    """A named block of the network, given by the module/parameter name prefixes it owns."""

    name: str
    prefixes: tuple[str, ...]

    def owns(self, parameter_name: str) -> bool:
        """Whether a parameter (or module) name lies inside this group."""
        return any(parameter_name == p or parameter_name.startswith(p + ".") for p in self.prefixes)


def layer_groups(model: nn.Module, arch: str) -> list[LayerGroup]:
    """Ordered layer groups of ``model`` (built by ``create_model(arch, ...)``), head last.

    Raises:
        RuntimeError: a parameter is in no group or in two (a bug in the family table).
    """
    head = head_module_name(model)
    body = _body_groups(model, arch, head)
    groups = [*body, LayerGroup(HEAD, (head,))]
    _check_partition(model, groups)
    return groups


def family(arch: str) -> str:
    """Architecture family used to cut layer groups."""
    for prefix, name in _FAMILIES:
        if arch.startswith(prefix):
            return name
    return "generic"


_FAMILIES = (
    ("resnet", "resnet"),
    ("resnext", "resnet"),
    ("wide_resnet", "resnet"),
    ("regnet", "regnet"),
    ("efficientnet", "efficientnet"),
    ("mobilenet_v2", "mobilenet"),
    ("mobilenet_v3", "mobilenet"),
    ("convnext", "convnext"),
    ("swin", "swin"),
    ("vit", "vit"),
)


def _body_groups(model: nn.Module, arch: str, head: str) -> list[LayerGroup]:
    kind = family(arch)
    if kind == "resnet":
        return [
            LayerGroup("stem", ("conv1", "bn1")),
            *(LayerGroup(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)),
        ]
    if kind == "regnet":
        blocks = [name for name, _ in model.get_submodule("trunk_output").named_children()]
        return [
            LayerGroup("stem", ("stem",)),
            *(LayerGroup(b, (f"trunk_output.{b}",)) for b in blocks),
        ]
    if kind == "efficientnet":
        n = len(_children(model, "features"))
        stages = [LayerGroup(f"stage{i}", (f"features.{i}",)) for i in range(1, n - 1)]
        last = stages[-1]
        stages[-1] = LayerGroup(last.name, (*last.prefixes, f"features.{n - 1}"))
        return [LayerGroup("stem", ("features.0",)), *stages]
    if kind == "mobilenet":
        return _stride_stages(model)
    if kind in ("convnext", "swin"):
        # features: stem, stage1, downsample, stage2, downsample, stage3, downsample, stage4
        n = len(_children(model, "features"))
        stages = [LayerGroup("stage1", ("features.1",))]
        for i in range(2, n, 2):
            stages.append(LayerGroup(f"stage{i // 2 + 1}", (f"features.{i}", f"features.{i + 1}")))
        if kind == "swin":
            last = stages[-1]
            stages[-1] = LayerGroup(last.name, (*last.prefixes, "norm"))
        return [LayerGroup("stem", ("features.0",)), *stages]
    if kind == "vit":
        blocks = [name for name, _ in model.get_submodule("encoder.layers").named_children()]
        groups = [LayerGroup("stem", ("conv_proj", "class_token", "encoder.pos_embedding"))]
        groups += [LayerGroup(f"block{i}", (f"encoder.layers.{b}",)) for i, b in enumerate(blocks)]
        last = groups[-1]
        groups[-1] = LayerGroup(last.name, (*last.prefixes, "encoder.ln"))
        return groups
    return [
        LayerGroup(name, (name,))
        for name, child in model.named_children()
        if name != head and any(True for _ in child.parameters())
    ]


def _children(model: nn.Module, path: str) -> list[nn.Module]:
    return list(model.get_submodule(path).children())


def _stride_stages(model: nn.Module) -> list[LayerGroup]:
    """MobileNet ``features``: a new stage starts at every block whose depthwise conv strides."""
    blocks = _children(model, "features")
    stages: list[list[str]] = []
    for i, block in enumerate(blocks[1:-1], start=1):
        if _is_strided(block) or not stages:
            stages.append([])
        stages[-1].append(f"features.{i}")
    stages[-1].append(f"features.{len(blocks) - 1}")
    return [
        LayerGroup("stem", ("features.0",)),
        *(LayerGroup(f"stage{i}", tuple(s)) for i, s in enumerate(stages, start=1)),
    ]


def _is_strided(block: nn.Module) -> bool:
    return any(
        isinstance(m, nn.Conv2d) and m.groups > 1 and max(m.stride) > 1 for m in block.modules()
    )


def _check_partition(model: nn.Module, groups: list[LayerGroup]) -> None:
    for name, _ in model.named_parameters():
        owners = [g.name for g in groups if g.owns(name)]
        if len(owners) != 1:
            raise RuntimeError(f"parameter {name} is in groups {owners}; expected exactly one")


def group_parameters(model: nn.Module, group: LayerGroup) -> Iterator[tuple[str, nn.Parameter]]:
    """Named parameters of ``model`` that belong to ``group``."""
    return ((n, p) for n, p in model.named_parameters() if group.owns(n))


def group_modules(model: nn.Module, group: LayerGroup) -> Iterator[nn.Module]:
    """Submodules of ``model`` inside ``group``."""
    return (m for n, m in model.named_modules() if n and group.owns(n))
