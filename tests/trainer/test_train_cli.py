"""``trainer`` command line: subcommands, exit codes and the documented error messages."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from trainer_helpers import tiny_train_args

from trainer.checkpoint import load_checkpoint
from trainer.cli import build_parser, main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_subcommands_are_registered() -> None:
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest == "command"]
    assert {"train", "export", "make-demo-data"} <= set(actions[0].choices)


def test_missing_data_dir_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    code = main(["train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert code == 2
    assert f"trainer: error: data: {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_bad_flag_value_exits_2(tmp_path: Path, capsys) -> None:
    code = main(["train", "--data", "d", "--output", "o", "--batch-size", "zero"])
    assert code == 2 and "--batch-size" in capsys.readouterr().err


def test_default_weights_without_cache_or_network_exit_2(
    image_folder: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    # Empty torchvision cache, and every HTTP(S) request sent to a proxy port nothing listens on.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    proxy = f"http://127.0.0.1:{_closed_port()}"
    for name in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    output = tmp_path / "out"
    code = main(
        ["train", "--data", str(image_folder), "--output", str(output), "--weights", "DEFAULT"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot obtain the pretrained weights ResNet18_Weights.IMAGENET1K_V1" in err
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in err
    assert "--build-arg WEIGHTS=resnet18" in err and "--weights PATH" in err
    assert not (output / "checkpoints").exists()  # stopped before any training


@pytest.mark.slow
def test_weights_none_run_writes_every_output(image_folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    code = main(
        tiny_train_args(
            image_folder, output, batch_size=8, extra=("--finetune-epochs", "1", "--no-export")
        )
    )
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["weights"] == "none" and summary["classes"] == ["circle", "square", "triangle"]
    assert 0.0 <= summary["best_val_accuracy"] <= 1.0
    assert list(summary["phases"]) == ["finetune"]  # no head phase from scratch by default
    assert summary["phases"]["finetune"]["images_per_second"] > 0
    line = json.loads((output / "metrics.jsonl").read_text().splitlines()[0])
    assert {"phase", "epoch", "global_epoch", "train_loss", "val_loss", "val_accuracy"} <= set(line)
    assert set(line["lrs"]) == {"stem", "layer1", "layer2", "layer3", "layer4", "head"}
    assert len(set(line["lrs"].values())) == 1  # from scratch: no layer-wise decay
    saved = yaml.safe_load((output / "config.yaml").read_text())
    resolved = {"head_epochs": 0, "unfreeze": "all", "lr_decay": 1.0, "channels_last": False}
    assert {k: saved[k] for k in resolved} == resolved
    assert saved["lr"] == saved["head_lr"] and saved["num_workers"] == 0
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    stored = load_checkpoint(output / "checkpoints" / "best.pt").header.config
    assert stored == saved
    report = output / "report"
    assert (report / "curves.png").is_file() and (report / "per_class.json").is_file()


def test_invalid_model_name_stops_at_start_up(image_folder: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    code = main([*tiny_train_args(image_folder, output, batch_size=4), "--model-name", "_x"])
    assert code == 2
    assert "model_name: model name '_x' is invalid" in capsys.readouterr().err
    assert not output.exists()  # refused before any training or output


def test_train_help_shows_every_default(capsys) -> None:
    from trainer.config import AUTO_MEANS_UNSET, FIELDS, RESOLVED_AT_START

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: resnet18)" in text and "(default: 32)" in text
    assert "(default: on)" in text  # --export
    assert "(choices: fp32, fp16, int8) (default: fp32)" in text
    auto = len(AUTO_MEANS_UNSET)  # init, lr, lr_decay, unfreeze: from the data unless given
    resolved_auto = len(RESOLVED_AT_START & AUTO_MEANS_UNSET.keys())
    assert text.count("(default: resolved at start)") == len(RESOLVED_AT_START) - resolved_auto
    assert text.count("(default: auto)") >= auto
    assert text.count("(default: decided by --augment)") == 3  # hflip, vflip, rotate90
    # Every field states its default (or that it is required).
    assert text.count("(default:") + text.count("(required)") >= len(FIELDS) - 3


@pytest.mark.parametrize("command", ["export", "make-demo-data"])
def test_every_option_has_help(command: str) -> None:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    sub = subparsers.choices[command]
    undocumented = [a.dest for a in sub._actions if not a.help]
    assert undocumented == []
