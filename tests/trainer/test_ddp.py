"""DDP: torchrun with two CPU processes (gloo) trains both phases and exports exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import make_image_folder, tiny_train_args


@pytest.mark.slow
def test_torchrun_two_processes_complete_both_phases_and_export_once(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), train_per_class=8)
    output = tmp_path / "out"
    # One thread per process: two ranks share the two cores without oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAINER_LOG_FORMAT": "plain"}
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "trainer",
        *tiny_train_args(
            data, output, batch_size=4, extra=("--head-epochs", "1", "--finetune-epochs", "1")
        ),
    ]
    done = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=540
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert list(summary["phases"]) == ["head", "finetune"]
    assert summary["model_name"] == "classifier" and summary["model_version"] == 1
    versions = [
        p.name for p in (output / "model_repository" / "classifier").iterdir() if p.is_dir()
    ]
    assert versions == ["1"]
    assert log.count("event=exported") == 1
    assert log.count("event=epoch_end") == 2  # rank 0 alone logs
    lines = (output / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["phase"] for x in lines] == ["head", "finetune"]
    assert all(json.loads(x)["train_loss"] > 0 for x in lines)


@pytest.mark.slow
def test_torchrun_ranks_reach_one_phase_2_choice(tmp_path: Path) -> None:
    """From pretrained weights every rank runs the LR range test and the trials on its shard;
    the summed losses and val confusions give each the same choice, and the run completes."""
    from trainer_helpers import tiny_config

    from trainer.run import train

    source_data = make_image_folder(tmp_path / "source", train_per_class=8)
    train(tiny_config(source_data, tmp_path / "source-run", batch_size=8, calibrate="off"))
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), train_per_class=16, seed=2)
    output = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAINER_LOG_FORMAT": "plain"}
    args = tiny_train_args(
        data, output, batch_size=4, extra=("--head-epochs", "1", "--finetune-epochs", "1")
    )
    args[args.index("--weights") + 1] = str(tmp_path / "source-run/checkpoints/best.pt")
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "trainer",
        *args,
        "--no-export",
    ]
    done = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=540
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    choice = summary["finetune_choice"]
    assert summary["init_choice"]["init"] == "weights" and choice["unfreeze_source"] == "search"
    flat = choice["unfreeze"] == "all" and choice["lr_decay"] == 1.0
    assert choice["lr_source"] == ("head lr" if flat else "range test")
    assert log.count("event=finetune_choice") == 1  # rank 0 alone logs; every rank chose
    assert log.count("event=init_choice") == 1
