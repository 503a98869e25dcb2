"""Preemption: SIGTERM mid-phase-2, then --resume auto, ends exactly where an uninterrupted run
ends; a corrupt checkpoint is skipped with a warning."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_helpers import make_image_folder, tiny_config, tiny_train_args

from contracts.preprocessing import Preprocessing
from trainer import checkpoint as ckpt
from trainer.run import train


class _SigtermAtEvent(logging.Handler):
    """Sends this process a real SIGTERM when the trainer logs the given event."""

    def __init__(self, event: str, phase: str) -> None:
        super().__init__(logging.INFO)
        self.event, self.phase, self.fired = event, phase, False

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "structured_fields", {})
        if self.fired or getattr(record, "structured_event", None) != self.event:
            return
        if fields.get("phase") == self.phase:
            self.fired = True
            os.kill(os.getpid(), signal.SIGTERM)


def _config(data: Path, output: Path):
    return tiny_config(
        data,
        output,
        head_epochs=1,
        finetune_epochs=2,
        unfreeze="gradual:1",
        ema=True,
        mixup_alpha=0.2,
        deterministic=True,
        patience=9,
        arch="mobilenet_v3_small",
    )


@pytest.mark.slow
def test_sigterm_mid_finetune_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    # Two steps per epoch: the stop lands after the first step of phase 2, mid-epoch.
    image_folder = make_image_folder(
        tmp_path / "data", classes=("a", "b"), train_per_class=4, val_per_class=2
    )
    uninterrupted = tmp_path / "straight"
    train(_config(image_folder, uninterrupted))

    resumed = tmp_path / "resumed"
    trigger = _SigtermAtEvent("phase_start", "finetune")
    logger = logging.getLogger("trainer.finetune.phase_runner")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(trigger)
    try:
        summary = train(_config(image_folder, resumed))
    finally:
        logger.removeHandler(trigger)
        logger.setLevel(level)
    assert trigger.fired and summary["status"] == "interrupted"
    stopped = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert (stopped["phase"], stopped["epoch"], stopped["step"]) == ("finetune", 1, 1)
    assert not (resumed / "summary.json").exists()

    summary = train(_config(image_folder, resumed))  # resume defaults to auto
    assert summary["status"] == "completed"

    a = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert (b["phase"], b["epoch"], b["global_epoch"]) == ("finetune", 2, 3)
    for key in ("model_state", "ema_state"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    metrics_a = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    metrics_b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [m["global_epoch"] for m in metrics_b] == [1, 2, 3]
    assert [m["val_accuracy"] for m in metrics_a] == [m["val_accuracy"] for m in metrics_b]
    assert metrics_a[-1]["val_loss"] == metrics_b[-1]["val_loss"]


def _minimal_checkpoint(phase: str, epoch: int, step: int) -> ckpt.Checkpoint:
    header = ckpt.CheckpointHeader(
        arch="resnet18",
        classes=("a", "b"),
        head=ckpt.HeadSpec(),
        preprocessing=Preprocessing((32, 32), 37),
        weights="none",
        dataset_fingerprint={},
        config={},
    )
    position = ckpt.Position(ckpt.PHASE_ORDER[phase], epoch, step)
    return ckpt.Checkpoint(header, position, ckpt.Progress(), model_state={})


def test_truncated_checkpoint_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    ckpt.save(tmp_path, ckpt.serialize(_minimal_checkpoint("head", 2, ckpt.EPOCH_DONE)), best=True)
    newer = ckpt.serialize(_minimal_checkpoint("finetune", 1, 3))
    (tmp_path / ckpt.LAST).write_bytes(newer[: len(newer) // 2])
    with caplog.at_level(logging.WARNING):
        found = ckpt.find_resumable(tmp_path)
    assert found is not None and found[0] == tmp_path / ckpt.BEST
    assert "skipping checkpoint" in caplog.text and "last.pt" in caplog.text


def test_newest_valid_checkpoint_wins(tmp_path: Path) -> None:
    ckpt.save(tmp_path, ckpt.serialize(_minimal_checkpoint("head", 2, ckpt.EPOCH_DONE)), best=True)
    ckpt.save(tmp_path, ckpt.serialize(_minimal_checkpoint("finetune", 1, 3)), best=False)
    found = ckpt.find_resumable(tmp_path)
    assert found is not None and found[0].name == ckpt.LAST
    assert ckpt.find_resumable(tmp_path / "empty") is None


def test_atomic_save_leaves_no_temp_files(tmp_path: Path) -> None:
    ckpt.save(tmp_path, b"x" * 1000, best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.BEST, ckpt.LAST]


@pytest.mark.slow
def test_sigterm_to_the_cli_saves_and_exits_0_in_time(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), train_per_class=8)
    output = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "trainer",
        *tiny_train_args(
            data,
            output,
            batch_size=2,
            extra=("--finetune-epochs", "50", "--no-export", "--stop-timeout", "120"),
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "event=phase_start" in line:
                break
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=180)
        elapsed = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    # Exit 0 means the step finished and last.pt was saved before the stop budget ran out
    # (the watchdog exits 143 otherwise); the budget is generous so a loaded machine passes.
    assert process.returncode == 0, rest[-3000:]
    assert elapsed < 120, elapsed
    assert "received SIGTERM" in rest and "event=stopped" in rest
    stopped = torch.load(output / "checkpoints" / "last.pt", weights_only=True)
    assert stopped["phase"] == "finetune" and stopped["epoch"] == 1
