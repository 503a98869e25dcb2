"""The export says what it does: one line per step with its duration, in order, and no
third-party INFO chatter; the quieting is scoped and restores the previous levels."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.export.step_log import THIRD_PARTY_LOGGERS, quiet_third_party

STEPS = ["load", "export", "check", "parity", "optimise", "quantise", "abstention", "golden_set"]
_LOG_LINE = re.compile(r"^\S+Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+) (.*)$")


@pytest.fixture
def _own_log_handler():
    """``trainer export`` installs a stderr handler on the root logger; take it away after."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == "trainer-structured":
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)


@pytest.mark.slow
@pytest.mark.usefixtures("_own_log_handler")
def test_export_logs_each_step_with_its_duration_and_no_third_party_info(
    resnet_export, image_folder: Path, tmp_path: Path, capfd
) -> None:
    _, checkpoint = resnet_export
    where = ("--output-repository", str(tmp_path / "r"), "--data", str(image_folder))
    code = main(["export", "--checkpoint", str(checkpoint), *where, "--precision", "fp16"])
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    records = [m.groups() for line in err.splitlines() if (m := _LOG_LINE.match(line))]
    steps = [
        re.search(r"step=(\w+) seconds=([\d.]+)", text)
        for _, logger, text in records
        if "event=export_step" in text
    ]
    assert [s.group(1) for s in steps if s] == [*STEPS, "publish"], err[-3000:]
    assert all(float(s.group(2)) >= 0 for s in steps if s)
    foreign = [(level, logger) for level, logger, _ in records if not logger.startswith("trainer")]
    assert foreign == [], foreign
    assert "onnx_ir" not in err and "onnxscript" not in err, err[-3000:]


def test_quieting_restores_the_previous_levels() -> None:
    logger = logging.getLogger("onnx_ir")
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with quiet_third_party():
            assert all(
                logging.getLogger(name).getEffectiveLevel() >= logging.WARNING
                for name in THIRD_PARTY_LOGGERS
            )
            assert not logging.getLogger("onnx_ir.passes.common").isEnabledFor(logging.INFO)
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(previous)
