"""Retraining without forgetting: EWC and L2-SP penalties, the Fisher estimate, the guard's
choice, and real runs: a run stores its Fisher in best.pt, a retrain from it applies EWC, a
retrain from a checkpoint without one falls back to L2-SP and says so."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from trainer_helpers import make_image_folder, tiny_config

from trainer import checkpoint as ckpt
from trainer.errors import CheckpointError, ConfigError
from trainer.finetune.forgetting import (
    EWC,
    L2SP,
    OFF,
    FisherInformation,
    choose_guard,
    estimate_fisher,
    ewc_penalty,
    l2sp_penalty,
)
from trainer.run import train

# ---- the penalties ------------------------------------------------------------------------


def _anchored() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    return model, {k: v.detach().clone() for k, v in model.named_parameters()}


def _shift(model: nn.Module, anchor: dict[str, torch.Tensor], delta: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(anchor[name] + delta)


def test_ewc_is_zero_at_the_previous_weights_and_grows_with_the_fisher_weighted_distance():
    model, anchor = _anchored()
    fisher = {k: torch.rand_like(v) + 0.1 for k, v in anchor.items()}
    assert ewc_penalty(model, anchor, fisher).item() == 0.0
    total = sum(f.sum().item() for f in fisher.values())
    penalties = []
    for delta in (0.1, 0.2, 0.4):
        _shift(model, anchor, delta)
        penalties.append(ewc_penalty(model, anchor, fisher).item())
        assert penalties[-1] == pytest.approx(total * delta**2, rel=1e-4)  # sum F_i d^2
    assert penalties == sorted(penalties)
    # Twice the Fisher, twice the penalty; a weight with zero Fisher is free to move.
    doubled = {k: 2 * v for k, v in fisher.items()}
    assert ewc_penalty(model, anchor, doubled).item() == pytest.approx(2 * penalties[-1])
    zero = {k: torch.zeros_like(v) for k, v in fisher.items()}
    assert ewc_penalty(model, anchor, zero).item() == 0.0


def test_ewc_gradient_pulls_toward_the_previous_weights():
    model, anchor = _anchored()
    fisher = {k: torch.ones_like(v) for k, v in anchor.items()}
    _shift(model, anchor, 0.5)
    ewc_penalty(model, anchor, fisher).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None
        assert torch.allclose(param.grad, 2 * fisher[name] * 0.5)


def test_l2sp_pulls_toward_the_source_weights_not_zero():
    model, anchor = _anchored()
    assert l2sp_penalty(model, anchor).item() == 0.0
    count = sum(v.numel() for v in anchor.values())
    _shift(model, anchor, 0.3)
    assert l2sp_penalty(model, anchor).item() == pytest.approx(count * 0.09, rel=1e-4)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()  # plain weight decay's optimum is far from the source
    squares = sum(v.pow(2).sum().item() for v in anchor.values())
    assert l2sp_penalty(model, anchor).item() == pytest.approx(squares, rel=1e-4)


# ---- the Fisher estimate ------------------------------------------------------------------


def test_fisher_matches_the_exact_fisher_of_softmax_regression():
    # For logits = W x + b: F(W[k, j]) = mean_x p_k (1 - p_k) x_j^2, F(b[k]) = mean p_k (1 - p_k).
    torch.manual_seed(1)
    model = nn.Linear(3, 4)
    images = torch.randn(2400, 3) * torch.tensor([0.5, 1.0, 2.0])  # Fisher values 16x apart
    batches = [(images[i : i + 40], torch.zeros(40)) for i in range(0, len(images), 40)]
    diagonal, used, samples = estimate_fisher(
        model, batches, prepare=lambda x: x, max_images=2400, chunk=4, seed=0
    )
    assert used == 2400 and samples == 600
    with torch.no_grad():
        p = torch.softmax(model(images), dim=1)
        variance = p * (1 - p)
        exact_weight = (variance[:, :, None] * images[:, None, :] ** 2).mean(0)
        exact_bias = variance.mean(0)
    assert diagonal["weight"].sum().item() == pytest.approx(exact_weight.sum().item(), rel=0.1)
    assert diagonal["bias"].sum().item() == pytest.approx(exact_bias.sum().item(), rel=0.1)
    ratio = diagonal["weight"] / exact_weight  # each element within the estimate's noise
    assert ratio.min().item() > 0.75 and ratio.max().item() < 1.3


def test_fisher_estimate_is_bounded_and_puts_requires_grad_back():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    model.train()
    batches = [(torch.randn(10, 3), torch.zeros(10)) for _ in range(5)]
    diagonal, used, samples = estimate_fisher(
        model, batches, prepare=lambda x: x, max_images=23, chunk=8
    )
    assert used == 23 and samples == 5  # chunks of 8 + 2, 8 + 2, then 3 of the third batch
    assert set(diagonal) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all((v >= 0).all() for v in diagonal.values())
    assert diagonal["0.weight"].sum() > 0  # frozen or not, every weight gets its Fisher
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert not model.training  # the deployed model: dropout off


def test_fisher_record_round_trips_through_the_safe_loader(tmp_path: Path):
    record = FisherInformation(
        {"fc.weight": torch.rand(2, 3)}, images=10, samples=2, train_images=40
    )
    path = tmp_path / "fisher.pt"
    torch.save({"fisher": record.to_dict()}, path)
    loaded = ckpt.read_torch_file(path)["fisher"]
    again = FisherInformation.from_dict(loaded, str(path))
    assert torch.equal(again.diagonal["fc.weight"], record.diagonal["fc.weight"])
    assert (again.images, again.samples, again.train_images) == (10, 2, 40)
    with pytest.raises(CheckpointError, match="no mapping of names to tensors"):
        FisherInformation.from_dict({"diagonal": {"w": [1.0]}}, "x.pt")
    with pytest.raises(CheckpointError, match="malformed"):
        FisherInformation.from_dict({"diagonal": {}}, "x.pt")


# ---- the guard's choice -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "weights", "is_file", "has_fisher", "method"),
    [
        ("auto", "runs/a/checkpoints/best.pt", True, True, EWC),
        ("auto", "runs/a/checkpoints/best.pt", True, False, L2SP),
        ("auto", "DEFAULT", False, False, OFF),
        ("auto", "none", False, False, OFF),
        ("off", "runs/a/checkpoints/best.pt", True, True, OFF),
        ("l2sp", "runs/a/checkpoints/best.pt", True, True, L2SP),
        ("l2sp", "IMAGENET1K_V1", False, False, L2SP),
        ("ewc", "runs/a/checkpoints/best.pt", True, True, EWC),
    ],
)
def test_the_guard_follows_the_source(mode, weights, is_file, has_fisher, method) -> None:
    choice = choose_guard(mode, weights, is_file=is_file, has_fisher=has_fisher)
    assert choice.method == method and choice.reason


def test_asking_for_what_the_source_cannot_serve_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="ewc needs a checkpoint of this trainer"):
        choose_guard("ewc", "state_dict.pt", is_file=True, has_fisher=False)
    with pytest.raises(ConfigError, match="--weights none has none"):
        choose_guard("l2sp", "none", is_file=False, has_fisher=False)


# ---- real runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A tiny finished run (from scratch) and the grown data a retrain sees."""
    root = tmp_path_factory.mktemp("forgetting")
    data = make_image_folder(root / "data", classes=("a", "b"), train_per_class=6)
    summary = train(tiny_config(data, root / "source", finetune_epochs=1, calibrate="off"))
    grown = make_image_folder(root / "grown", classes=("a", "b"), train_per_class=8, seed=5)
    return root / "source" / "checkpoints" / "best.pt", grown, summary


def _retrain(source: Path, data: Path, output: Path) -> dict:
    # The policy and LR given: nothing to test before phase 2, the penalty is what is looked at.
    return train(
        tiny_config(
            data,
            output,
            weights=str(source),
            head_epochs=1,
            finetune_epochs=1,
            unfreeze="top:2",
            lr=1e-3,
            calibrate="off",
        )
    )


def _phase_two_penalties(output: Path) -> dict:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    finetune = [r for r in records if r["phase"] == "finetune"]
    assert finetune and all("penalties" in r for r in finetune)
    return finetune[-1]["penalties"]


@pytest.mark.slow
def test_a_run_stores_its_fisher_in_best_pt(source_run: tuple[Path, Path, dict]) -> None:
    best, _, summary = source_run
    checkpoint = ckpt.load_checkpoint(best)
    assert checkpoint.fisher is not None
    fisher = FisherInformation.from_dict(checkpoint.fisher, str(best))
    state, _ = checkpoint.best_state
    assert set(fisher.diagonal) == {k for k, v in state.items() if v.is_floating_point()} - {
        k for k in state if "running_" in k
    }
    assert all((v >= 0).all() and v.shape == state[k].shape for k, v in fisher.diagonal.items())
    assert sum(float(v.sum()) for v in fisher.diagonal.values()) > 0
    assert fisher.train_images == 12 and 0 < fisher.images <= 12
    assert summary["fisher_information"]["images"] == fisher.images
    assert summary["forgetting_guard"]["method"] == OFF  # from scratch: nothing to hold


@pytest.mark.slow
def test_a_retrain_from_it_applies_ewc(
    source_run: tuple[Path, Path, dict], tmp_path: Path, caplog
) -> None:
    best, grown, _ = source_run
    with caplog.at_level(logging.INFO, logger="trainer"):
        summary = _retrain(best, grown, tmp_path / "retrain")
    assert "event=forgetting_guard method=ewc" in caplog.text
    guard = summary["forgetting_guard"]
    assert guard["method"] == EWC and guard["source"] == str(best)
    # The Laplace weight: the source's 12 training images over twice this run's 16.
    assert guard["weight"] == pytest.approx(12 / (2 * 16))
    assert guard["fisher"]["train_images"] == 12 and guard["tensors"] > 0
    penalty = _phase_two_penalties(tmp_path / "retrain")["forgetting"]
    assert penalty["method"] == EWC and penalty["steps"] > 0
    assert penalty["value"] > 0 and penalty["term"] == pytest.approx(
        penalty["value"] * guard["weight"]
    )
    assert guard["last_epoch"] == penalty


@pytest.mark.slow
def test_a_retrain_from_a_checkpoint_without_fisher_falls_back_to_l2sp(
    source_run: tuple[Path, Path, dict], tmp_path: Path, caplog
) -> None:
    best, grown, _ = source_run
    older = tmp_path / "older.pt"
    written = dataclasses.replace(ckpt.load_checkpoint(best), fisher=None)
    older.write_bytes(ckpt.serialize(written))
    with caplog.at_level(logging.INFO, logger="trainer"):
        summary = _retrain(older, grown, tmp_path / "retrain")
    assert "event=forgetting_guard method=l2sp" in caplog.text
    assert "stores no Fisher information" in caplog.text
    guard = summary["forgetting_guard"]
    assert guard["method"] == L2SP and guard["fisher"] is None
    assert guard["weight"] == pytest.approx(0.05)
    penalty = _phase_two_penalties(tmp_path / "retrain")["forgetting"]
    assert penalty["method"] == L2SP and penalty["value"] > 0
