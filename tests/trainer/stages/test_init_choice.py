"""``--init auto``: the source weights, or the from-scratch recipe when a random
initialisation's features beat theirs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from trainer_helpers import make_image_folder, tiny_config

from trainer.errors import ConfigError
from trainer.model.classifier import create_model
from trainer.run import train
from trainer.stages.init_choice import random_initialisation

# Pinned so that the runs compared below augment alike (each run's probe decides them).
PINNED_AUGMENT = {"hflip": True, "vflip": False, "rotate90": False}


def test_the_random_initialisation_is_seeded_and_leaves_the_run_rng_alone(tmp_path: Path):
    config = tiny_config(tmp_path, tmp_path / "out")
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = random_initialisation(config, 3).state_dict()
    assert torch.equal(torch.rand(4), expected)
    again = random_initialisation(config, 3).state_dict()
    other = random_initialisation(dataclasses.replace(config, seed=1), 3).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.fixture(scope="module")
def blank_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Weights whose features carry nothing (every convolution zero) and a task to train."""
    root = tmp_path_factory.mktemp("init")
    model = create_model("resnet18", 3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
    torch.save(model.state_dict(), root / "blank.pt")
    data = make_image_folder(root / "data", train_per_class=10, val_per_class=5)
    return root / "blank.pt", data


def _run(data: Path, output: Path, **flags) -> dict:
    settings = {"batch_size": 8, "calibrate": "off", **PINNED_AUGMENT} | flags
    return train(tiny_config(data, output, **settings))


def _val_losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records]


def test_weights_without_useful_features_train_like_a_run_from_scratch(
    blank_source: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, data = blank_source
    summary = _run(data, tmp_path / "auto", weights=str(weights), head_epochs=1, finetune_epochs=2)
    init = summary["init_choice"]
    assert init["init"] == "random" and init["source"] == "test"
    assert init["random_init_probe_val_accuracy"] > init["weights_probe_val_accuracy"]
    recorded = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert (recorded["init"], recorded["unfreeze"], recorded["lr_decay"]) == ("random", "all", 1.0)
    assert recorded["freeze_bn"] is False and recorded["lr"] == recorded["head_lr"]
    assert summary["forgetting_guard"]["method"] == "off"
    assert summary["finetune_choice"]["trials"] == []
    strategies = (tmp_path / "auto" / "report" / "strategies.md").read_text()
    assert "probe on a random initialisation" in strategies and "`--init random`" in strategies
    # The head phase's epoch went to phase 2: three epochs training every layer, exactly the
    # run --weights none gives with those epochs.
    scratch = _run(data, tmp_path / "scratch", weights="none", head_epochs=0, finetune_epochs=3)
    assert _val_losses(tmp_path / "auto") == _val_losses(tmp_path / "scratch")
    assert len(_val_losses(tmp_path / "auto")) == 3
    assert summary["best_val_accuracy"] == scratch["best_val_accuracy"]
    # --init random given: the same run, the weights' values never loaded.
    given = _run(
        data,
        tmp_path / "given",
        weights=str(weights),
        init="random",
        head_epochs=1,
        finetune_epochs=2,
    )
    assert "init_choice" not in given and given["forgetting_guard"]["method"] == "off"
    assert _val_losses(tmp_path / "given") == _val_losses(tmp_path / "scratch")


def test_a_given_init_or_policy_is_not_tested(
    blank_source: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, data = blank_source
    common = {"weights": str(weights), "head_epochs": 1, "finetune_epochs": 1}
    kept = _run(data, tmp_path / "kept", init="weights", **common)
    assert "init_choice" not in kept
    assert yaml.safe_load((tmp_path / "kept" / "config.yaml").read_text())["init"] == "weights"
    policy = _run(data, tmp_path / "policy", unfreeze="top:1", **common)
    assert "init_choice" not in policy
    # Without a phase 2 the run is the probe on the weights' features that was asked for.
    probe_only = _run(data, tmp_path / "probe", **(common | {"finetune_epochs": 0}))
    assert "init_choice" not in probe_only and probe_only["head_phase_val_accuracy"] is not None


def test_init_random_refuses_a_guard_toward_the_weights_and_names_bad_values(
    blank_source: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, data = blank_source
    with pytest.raises(ConfigError, match="--init random"):
        _run(data, tmp_path / "ewc", weights=str(weights), init="random", forgetting_guard="l2sp")
    with pytest.raises(ConfigError, match="init: must be weights, random or auto"):
        tiny_config(data, tmp_path / "bad", init="sometimes")
    assert tiny_config(data, tmp_path / "auto", init="auto").init == ""


class _StopAfterFirstEpoch(logging.Handler):
    """A real SIGTERM to this process when phase 2's first epoch ends."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.fired = False

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "structured_event", None)
        phase = getattr(record, "structured_fields", {}).get("phase")
        if event == "epoch_end" and phase == "finetune" and not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_resumed_run_keeps_the_decided_init(
    blank_source: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, data = blank_source
    flags = {"weights": str(weights), "head_epochs": 1, "finetune_epochs": 2, "deterministic": True}
    _run(data, tmp_path / "straight", **flags)
    stop = _StopAfterFirstEpoch()
    logger = logging.getLogger("trainer.finetune.phase_runner")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(stop)
    try:
        stopped = _run(data, tmp_path / "resumed", **flags)
    finally:
        logger.removeHandler(stop)
        logger.setLevel(level)
    assert stop.fired and stopped["status"] == "interrupted"
    # The same command again resumes: the recorded init (random) and its three-epoch plan.
    resumed = _run(data, tmp_path / "resumed", **flags)
    assert resumed["status"] == "completed" and "init_choice" not in resumed
    recorded = yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())
    assert recorded["init"] == "random"
    assert _val_losses(tmp_path / "resumed") == _val_losses(tmp_path / "straight")
    assert len(_val_losses(tmp_path / "resumed")) == 3
