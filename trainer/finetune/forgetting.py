"""Retraining without forgetting: EWC and L2-SP toward the weights a retrain starts from.

A retrain starts from a previous run's checkpoint (``--weights PATH``) on grown data. Left
alone, phase 2 moves the backbone wherever the new batches pull it and loses some of what the
previous run learnt. Two penalties hold it near the source weights θ*:

- **EWC** (Kirkpatrick et al. 2017): ``sum_i F_i (θ_i - θ*_i)^2``, each weight held in
  proportion to how much the previous model's predictions depend on it: F is the diagonal
  Fisher information of the previous model, estimated by ``estimate_fisher`` at the end of
  every run and stored in its ``best.pt`` (``FisherInformation``).
- **L2-SP** (Li et al. 2018): ``sum_i (θ_i - θ*_i)^2``, weight decay toward the source
  weights instead of toward zero, for sources without a Fisher (older checkpoints, a plain
  state dict, torchvision weights when asked for).

Only the backbone is held: the head is fitted anew by the head phase (and replaced when the
class count changed), so there is nothing of the source's head to keep.

``--forgetting-guard auto`` (the default) is EWC when the source checkpoint carries a Fisher,
L2-SP when ``--weights`` is another file, and off for torchvision weights and ``none`` (their
source task is not this model's); the choice and why are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.errors import CheckpointError, ConfigError
from trainer.finetune.step_penalty import TermRecord
from trainer.model.classifier import head_module_name

log = logging.getLogger(__name__)

EWC = "ewc"
L2SP = "l2sp"
OFF = "off"
AUTO = "auto"
#: Images and images per gradient sample of the Fisher estimate at the end of a run.
FISHER_MAX_IMAGES = 512
FISHER_CHUNK = 8
#: L2-SP's alpha (the strength of the pull toward the source), of the range Li et al. searched.
L2SP_ALPHA = 0.1
FISHER_ESTIMATOR = (
    "diagonal; labels sampled from the model's own predictions; chunk size x the squared "
    "gradient of the chunk's mean log-likelihood, averaged over chunks"
)


# ---- the penalties ------------------------------------------------------------------------


def weighted_squared_distance(
    triples: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
) -> torch.Tensor:
    """``sum w * (θ - θ*)^2`` over ``(θ, θ*, w)`` triples; ``w`` None weighs every element 1."""
    terms = [
        ((param - anchor).pow(2) * (1.0 if weight is None else weight)).sum()
        for param, anchor, weight in triples
    ]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def ewc_penalty(
    model: nn.Module, anchor: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """EWC's ``sum_i F_i (θ_i - θ*_i)^2`` over the parameters named in both ``anchor`` (θ*)
    and ``fisher`` (F); zero at the anchor."""
    return weighted_squared_distance(
        (param, anchor[name], fisher[name])
        for name, param in model.named_parameters()
        if name in anchor and name in fisher
    )


def l2sp_penalty(model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L2-SP's ``sum_i (θ_i - θ*_i)^2``: the pull toward the source weights ``anchor`` (θ*),
    not toward zero; zero at the source weights."""
    return weighted_squared_distance(
        (param, anchor[name], None) for name, param in model.named_parameters() if name in anchor
    )


# ---- the Fisher information ---------------------------------------------------------------


@dataclass(frozen=True)
class FisherInformation:
    """The diagonal Fisher of a model, by parameter name, and what it was estimated on.

    Stored in ``best.pt`` under ``fisher`` as tensors and plain values (the safe loader reads
    it without running code); ``train_images`` is the run's training-set size, the data count
    in EWC's Laplace weight.
    """

    diagonal: dict[str, torch.Tensor]
    images: int
    samples: int
    train_images: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "diagonal": self.diagonal,
            "images": self.images,
            "gradient_samples": self.samples,
            "train_images": self.train_images,
            "estimator": FISHER_ESTIMATOR,
        }

    def facts(self) -> dict[str, Any]:
        """The counts, without the tensors (summary, logs)."""
        return {
            "images": self.images,
            "gradient_samples": self.samples,
            "train_images": self.train_images,
            "parameters": len(self.diagonal),
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], where: str) -> FisherInformation:
        """Raises ``CheckpointError`` naming ``where`` when the record is malformed."""
        diagonal = document.get("diagonal")
        if not isinstance(diagonal, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in diagonal.values()
        ):
            raise CheckpointError(f"{where}: 'fisher' holds no mapping of names to tensors")
        try:
            return cls(
                diagonal=dict(diagonal),
                images=int(document["images"]),
                samples=int(document["gradient_samples"]),
                train_images=int(document["train_images"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: 'fisher' is malformed ({exc})") from None


def estimate_fisher(  # noqa: PLR0913  the bounds are keyword-only, with defaults
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    max_images: int = FISHER_MAX_IMAGES,
    chunk: int = FISHER_CHUNK,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """The diagonal Fisher information of ``model`` on the images of ``batches``.

    ``F = E_x E_{y ~ p(y|x)} [(d log p(y|x) / dθ)^2]``, from the model's own predictions:
    each chunk of ``chunk`` images gets labels drawn from its predicted distribution, and
    ``chunk * g^2`` of the gradient g of the chunk's mean log-likelihood is one sample. Since
    ``E_{y ~ p}[d log p(y|x) / dθ] = 0`` for every image, the cross terms of the square vanish
    in expectation: the estimate is unbiased, at the cost of one backward pass per chunk
    instead of per image. The labels in ``batches`` are not used. BatchNorm and dropout are
    in eval mode (the deployed model; ``model`` is left so); parameters' ``requires_grad`` is
    put back afterwards.

    Returns:
        The diagonal by parameter name (on ``model``'s device), the images used and the
        number of gradient samples.
    """
    model.eval()
    named = dict(model.named_parameters())
    wanted = {name: param.requires_grad for name, param in named.items()}
    for param in named.values():
        param.requires_grad_(True)
    sums = {name: torch.zeros_like(param) for name, param in named.items()}
    generator = torch.Generator().manual_seed(seed)
    images = samples = 0
    try:
        for raw, _labels in batches:
            for whole in raw.split(chunk):
                part = whole[: max_images - images]
                if len(part) == 0:
                    break
                logits = model(prepare(part)).float()
                with torch.no_grad():
                    probabilities = torch.softmax(logits, dim=1).cpu()
                    drawn = torch.multinomial(probabilities, 1, generator=generator)
                labels = drawn.squeeze(1).to(logits.device)
                loss = nn.functional.cross_entropy(logits, labels)
                grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
                for (name, _), grad in zip(named.items(), grads, strict=True):
                    if grad is not None:
                        sums[name] += len(part) * grad.detach().pow(2)
                images += len(part)
                samples += 1
            if images >= max_images:
                break
    finally:
        for name, param in named.items():
            param.requires_grad_(wanted[name])
    return {name: total / max(1, samples) for name, total in sums.items()}, images, samples


# ---- the guard of a retrain ---------------------------------------------------------------


@dataclass(frozen=True)
class GuardChoice:
    """Which penalty a run uses and why (logged and in ``summary.json``)."""

    method: str
    reason: str


def choose_guard(mode: str, weights: str, *, is_file: bool, has_fisher: bool) -> GuardChoice:
    """The guard of ``--forgetting-guard mode`` for ``--weights weights``.

    Raises:
        ConfigError: ``ewc`` without a source Fisher, or ``ewc``/``l2sp`` from scratch.
    """
    scratch = weights.strip().lower() == "none"
    if mode == OFF:
        return GuardChoice(OFF, "--forgetting-guard off")
    if scratch:
        if mode != AUTO:
            raise ConfigError(
                f"forgetting_guard: {mode} holds the weights near the source weights, but "
                "--weights none has none; use --forgetting-guard auto or off"
            )
        return GuardChoice(OFF, "training from scratch: no source weights to stay near")
    if mode == EWC and not has_fisher:
        raise ConfigError(
            f"forgetting_guard: ewc needs a checkpoint of this trainer that stores its Fisher "
            f"information (every run's best.pt since the Fisher was added); {weights} has "
            "none: use --forgetting-guard l2sp or auto"
        )
    if mode == EWC or (mode == AUTO and has_fisher):
        return GuardChoice(EWC, f"the source checkpoint {weights} stores its Fisher information")
    if mode == L2SP:
        return GuardChoice(L2SP, "--forgetting-guard l2sp")
    if is_file:
        return GuardChoice(
            L2SP,
            f"the source {weights} stores no Fisher information (an older checkpoint or a "
            "plain state dict): L2-SP toward its weights instead of EWC",
        )
    return GuardChoice(
        OFF,
        f"torchvision weights {weights}: their source task is not a previous run of this "
        "model (--forgetting-guard l2sp holds them anyway)",
    )


class ForgettingGuard:
    """The ``StepPenalty`` of EWC or L2-SP over the backbone's trainable parameters."""

    def __init__(  # noqa: PLR0913  the choice, the source and how strongly to hold it
        self,
        model: nn.Module,
        choice: GuardChoice,
        anchor: Mapping[str, torch.Tensor],
        fisher: FisherInformation | None,
        *,
        weight: float,
        source: str,
    ) -> None:
        head = head_module_name(model) + "."
        device = next(model.parameters()).device
        diagonal = fisher.diagonal if fisher is not None and choice.method == EWC else None
        self.triples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        for name, param in model.named_parameters():
            if name.startswith(head) or name not in anchor:
                continue
            if anchor[name].shape != param.shape:
                continue
            if diagonal is not None and name not in diagonal:
                continue
            held = anchor[name].to(device=device, dtype=param.dtype)
            importance = diagonal[name].to(device=device, dtype=param.dtype) if diagonal else None
            self.triples.append((param, held, importance))
        if not self.triples:
            raise ConfigError(
                f"forgetting_guard: {source} shares no backbone weight with this model"
            )
        self.choice = choice
        self.fisher = fisher
        self.weight = weight
        self.source = source
        self.record = TermRecord()
        self.last_epoch: dict[str, Any] | None = None

    def begin_epoch(self, first_step: int, total_steps: int) -> None:
        """The weight is constant: nothing to position."""

    def __call__(self, model: nn.Module) -> torch.Tensor:
        # Frozen parameters have not moved and get no gradient: only the trainable ones count.
        value = weighted_squared_distance(t for t in self.triples if t[0].requires_grad)
        value = value.to(self.triples[0][0].device)
        self.record.add(value, self.weight)
        return value * self.weight

    def end_epoch(self) -> dict[str, Any]:
        self.last_epoch = {"method": self.choice.method, **self.record.summary()}
        return {"forgetting": self.last_epoch}

    def facts(self) -> dict[str, Any]:
        """The guard's method, reason, source and weight, for the summary."""
        return {
            "method": self.choice.method,
            "reason": self.choice.reason,
            "source": self.source,
            "weight": self.weight,
            "tensors": len(self.triples),
            "elements": sum(t[0].numel() for t in self.triples),
            "fisher": self.fisher.facts() if self.fisher is not None else None,
            "last_epoch": self.last_epoch,
        }


def guard_weight(
    choice: GuardChoice, strength: float, fisher: FisherInformation | None, train_images: int
) -> float:
    """The penalty's weight in the mean training loss.

    EWC: ``strength * n_source / (2 n)``, the Laplace approximation's weight: the source
    run's posterior over its ``n_source`` images is ``exp(-n_source / 2 * sum F Δ^2)``, and
    this run's loss is a mean over its ``n`` images. L2-SP: ``strength * alpha / 2`` with
    ``L2SP_ALPHA``. Neither is tuned on a benchmark.
    """
    if choice.method == EWC and fisher is not None:
        return strength * fisher.train_images / (2.0 * max(1, train_images))
    return strength * L2SP_ALPHA / 2.0
