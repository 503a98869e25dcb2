"""Config precedence (defaults < YAML < environment < flags) and the errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config import TrainConfig, resolve_config, save_config
from trainer.errors import ConfigError

REQUIRED = {"data": "d", "output": "o"}


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "train.yaml"
    file.write_text("batch_size: 16\nlr: 0.01\nhead-lr: 0.02\narch: resnet50\nema: true\n")
    env = {"TRAINER_LR": "0.001", "TRAINER_ARCH": "mobilenet_v3_small", "PATH": "/bin"}
    config = resolve_config(file=file, environ=env, flags={**REQUIRED, "arch": "resnet18"})
    assert config.batch_size == 16  # file over default
    assert config.head_lr == 0.02 and config.ema is True
    assert config.lr == 0.001  # environment over file
    assert config.arch == "resnet18"  # flag over environment
    assert config.finetune_epochs == TrainConfig().finetune_epochs  # default
    assert config.data == Path("d")


@pytest.mark.parametrize(
    ("environ", "flags", "message"),
    [
        ({"TRAINER_BATCH_SIZE": "many"}, {}, "TRAINER_BATCH_SIZE: invalid literal"),
        ({"TRAINER_LEARNING_RATE": "1"}, {}, "TRAINER_LEARNING_RATE: unknown setting"),
        ({}, {"ema": "perhaps"}, "--ema: expected true/false"),
        ({}, {"amp": "fp8"}, "amp: expected one of auto, off, bf16, fp16"),
        ({}, {"val_fraction": "1.5"}, "val_fraction: must be between 0 and 1"),
        ({}, {"unfreeze": "top:zero"}, "unfreeze: must be top:K, all, gradual:N or auto"),
        ({}, {"batch_size": "2.5"}, "--batch-size: invalid literal"),
        ({}, {"invert": "2"}, "invert: must be in"),
        ({}, {"invert": "often"}, "--invert: expected a number in"),
        ({}, {"model_name": "../x"}, "model_name"),
        ({}, {"model_name": "_x"}, "model_name: model name '_x' is invalid"),
    ],
)
def test_bad_values_name_the_key(environ: dict, flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_config(environ=environ, flags={**REQUIRED, **flags})


def test_unknown_file_key_is_an_error(tmp_path: Path) -> None:
    file = tmp_path / "train.yaml"
    file.write_text("batch_size: 8\nepochs: 3\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) epochs"):
        resolve_config(file=file, environ={}, flags=REQUIRED)


def test_data_and_output_are_required() -> None:
    with pytest.raises(ConfigError, match="data: is required"):
        resolve_config(environ={}, flags={"output": "o"})


def test_saved_config_round_trips(tmp_path: Path) -> None:
    config = resolve_config(environ={}, flags={**REQUIRED, "image_size": "64", "ema": True})
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["image_size"] == 64 and saved["data"] == "d"
    assert resolve_config(file=tmp_path / "config.yaml", environ={}) == config


def test_resolve_defaults_fills_every_derived_field() -> None:
    from trainer.config import RESOLVED_AT_START, resolve_defaults

    scratch = resolve_config(environ={}, flags={**REQUIRED, "weights": "none"})
    resolved = resolve_defaults(scratch, device_type="cpu", dataset_cached=True, cpu_count=4)
    assert all(getattr(resolved, name) not in (None, "") for name in RESOLVED_AT_START)
    assert (resolved.head_epochs, resolved.unfreeze) == (0, "all")
    assert (resolved.lr, resolved.lr_decay) == (scratch.head_lr, 1.0)
    assert (resolved.channels_last, resolved.num_workers, resolved.freeze_bn) == (False, 0, False)

    pretrained = resolve_config(environ={}, flags={**REQUIRED, "lr": "0.01"})
    resolved = resolve_defaults(pretrained, device_type="cuda", dataset_cached=False, cpu_count=16)
    # The policy and its decay stay auto (unset) for a pretrained start: the run's search
    # chooses them; a given policy gets the classic decay.
    assert (resolved.head_epochs, resolved.unfreeze, resolved.lr) == (2, "", 0.01)
    assert (resolved.lr_decay, resolved.channels_last, resolved.num_workers) == (None, True, 8)
    given = resolve_config(environ={}, flags={**REQUIRED, "unfreeze": "top:2"})
    assert (
        resolve_defaults(given, device_type="cpu", dataset_cached=True, cpu_count=1).lr_decay == 0.3
    )
    assert resolved.freeze_bn  # phase 2 keeps the statistics the head was fitted with
    # Resolving a resolved config changes nothing; what the user gave is kept.
    assert resolve_defaults(resolved, device_type="cpu", dataset_cached=True, cpu_count=1) == (
        resolved
    )
