"""The classifier network: any torchvision classifier with a fresh N-class head.

``create_model`` is the one way the trainer and the exporter build a network, and
``restore_classifier`` the one way a checkpoint becomes a network again: from the header's
``arch``, class count and ``head`` alone, so the module layout must depend on nothing else.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision import models as tv_models

from trainer.checkpoint import Checkpoint
from trainer.errors import CheckpointError, ConfigError


def available_architectures() -> list[str]:
    """Names accepted by ``create_model``: torchvision's classification models."""
    return sorted(tv_models.list_models(module=tv_models))


def create_model(
    arch: str,
    num_classes: int,
    *,
    head_hidden: int | None = None,
    head_dropout: float = 0.0,
) -> nn.Module:
    """Build ``arch`` with random weights and an ``num_classes``-way head.

    The final ``nn.Linear`` of the torchvision model is replaced in place (same attribute
    path), so backbone parameter names match torchvision's state dicts.

    Args:
        arch: torchvision classification model name, e.g. ``resnet18``.
        num_classes: number of outputs of the new head.
        head_hidden: when set, the head is Linear -> ReLU -> Dropout -> Linear with this
            many hidden units.
        head_dropout: dropout probability before the last Linear of the head.

    Raises:
        ConfigError: unknown architecture, bad class count or head settings, or a model
            whose classifier is not a Linear layer.
    """
    if arch not in available_architectures():
        raise ConfigError(
            f"arch: unknown architecture {arch!r}; choose a torchvision classification model "
            "such as resnet18, efficientnet_b0, mobilenet_v3_small, convnext_tiny, "
            "regnet_y_400mf or vit_b_16"
        )
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    if head_hidden is not None and head_hidden < 1:
        raise ConfigError(f"head_hidden must be a positive integer, got {head_hidden}")
    if not 0.0 <= head_dropout < 1.0:
        raise ConfigError(f"head_dropout must be in [0, 1), got {head_dropout}")
    # aux_logits would add a second classifier to googlenet/inception; we train one head.
    kwargs = {"aux_logits": False, "init_weights": True} if arch in _AUX_ARCHS else {}
    model = tv_models.get_model(arch, weights=None, **kwargs)
    path = classifier_path(model)
    old = model.get_submodule(path)
    assert isinstance(old, nn.Linear)
    head = _build_head(old.in_features, num_classes, head_hidden, head_dropout)
    _set_submodule(model, path, head)
    return model


_AUX_ARCHS = {"googlenet", "inception_v3"}


def classifier_path(model: nn.Module) -> str:
    """Dotted path of the final Linear layer, the one that produces the logits.

    The last registered ``nn.Linear`` (or our replacement head) is the classifier in every
    torchvision classification model that ends in a Linear layer.

    Raises:
        ConfigError: the model has no Linear layer (e.g. squeezenet's conv classifier).
    """
    found = None
    for name, module in model.named_modules():
        if getattr(module, _HEAD_MARK, False):
            return name
        if isinstance(module, nn.Linear):
            found = name
    if found is None:
        raise ConfigError(
            f"{type(model).__name__} has no Linear classifier; choose another architecture"
        )
    return found


def head_module_name(model: nn.Module) -> str:
    """Top-level child holding the classifier (``fc``, ``classifier``, ``heads``, ``head``).

    This whole child is the trainable head of phase 1, so a pretrained pre-logits layer that
    sits beside the classifier (MobileNetV3, ConvNeXt's LayerNorm) trains with it.
    """
    return classifier_path(model).split(".")[0]


_HEAD_MARK = "_is_finetune_head"


def _build_head(
    in_features: int, num_classes: int, hidden: int | None, dropout: float
) -> nn.Module:
    head: nn.Module
    if hidden is None and dropout == 0.0:
        head = nn.Linear(in_features, num_classes)
    elif hidden is None:
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    else:
        head = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
    # Mark the head so classifier_path finds the whole replacement, not its inner Linear.
    setattr(head, _HEAD_MARK, True)
    return head


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP, ``torch.compile`` and training-view wrappers (for state
    dicts and the EMA)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(inner := getattr(model, "trained_module", None), nn.Module):
            model = inner  # trainer.finetune.frozen_prefix.FrozenPrefixView
        else:
            return model


def logits_dim(model: nn.Module) -> int:
    """Output width of the classifier."""
    head = model.get_submodule(classifier_path(model))
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)


def restore_classifier(checkpoint: Checkpoint) -> tuple[nn.Module, str]:
    """The checkpoint's classifier in eval mode, and which state it came from.

    EMA weights are used when the checkpoint has them: they are what the trainer evaluated
    as its best model when EMA was on.

    Raises:
        CheckpointError: the stored weights do not fit the stored architecture.
    """
    header = checkpoint.header
    model = create_model(
        header.arch,
        header.num_classes,
        head_hidden=header.head.hidden,
        head_dropout=header.head.dropout,
    )
    state, source = checkpoint.best_state
    try:
        model.load_state_dict(plain_state_dict(state))
    except (RuntimeError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"the checkpoint's {source} does not fit {header.arch} with "
            f"{header.num_classes} classes: {error}"
        ) from error
    return model.eval(), source


def plain_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Keys as ``create_model`` names them: no DDP, ``torch.compile`` or EMA wrapper prefixes.

    An EMA kept with ``torch.optim.swa_utils.AveragedModel`` saves ``module.``-prefixed keys
    and an ``n_averaged`` counter.
    """
    plain = {}
    for key, value in state.items():
        if key == "n_averaged":
            continue
        name = key
        for prefix in ("module.", "_orig_mod."):
            name = name.removeprefix(prefix)
        plain[name] = value
    return plain
