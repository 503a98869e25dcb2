"""Progress bars only on a terminal; structured log lines in logfmt or JSON."""

from __future__ import annotations

import io
import json
import logging
import math
import time

import numpy as np
import pytest
import torch

from trainer.progress import configure_logging, format_logfmt, log_event, progress


class _FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def root_logging():
    """Restore the root logger's handlers and level after a test that configures logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch):
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    bar = progress(range(5), total=5, desc="head 1/2")
    seen = []
    for item in bar:
        seen.append(item)
        bar.set_postfix(loss=0.5, lr=1e-3)
    bar.close()
    assert seen == [0, 1, 2, 3, 4]
    assert pipe.getvalue() == ""


def test_bar_on_a_terminal(monkeypatch):
    tty = _FakeTty()
    monkeypatch.setattr("sys.stderr", tty)
    bar = progress(iter(range(3)), total=3, desc="finetune 2/4")
    for _ in bar:
        bar.set_postfix(loss=0.123456)
        time.sleep(0.11)  # tqdm redraws at most every 0.1 s
    bar.close()
    drawn = tty.getvalue()
    assert "finetune 2/4" in drawn
    assert "3/3" in drawn
    assert "loss=0.1235" in drawn


def test_enabled_flag_overrides_detection(monkeypatch):
    tty = _FakeTty()
    monkeypatch.setattr("sys.stderr", tty)
    bar = progress(range(2), total=2, desc="rank1", enabled=False)
    assert list(bar) == [0, 1]
    assert tty.getvalue() == ""


def test_logfmt_quotes_and_types():
    line = format_logfmt(
        "epoch_end",
        {
            "phase": "head",
            "loss": np.float32(0.25),
            "step": torch.tensor(7),
            "ok": True,
            "missing": None,
            "path": "/tmp/a b/c",
            "quote": 'say "hi"',
            "lrs": {"head": 0.001, "layer4": 1e-4},
            "groups": ["head", "layer4"],
            "sizes": [1, 2.5],
            "odd": ["a b", "c"],
            "bad": math.nan,
        },
    )
    assert line == (
        'event=epoch_end phase=head loss=0.25 step=7 ok=true missing=null path="/tmp/a b/c" '
        r'quote="say \"hi\"" lrs.head=0.001 lrs.layer4=0.0001 groups=head,layer4 sizes=1,2.5 '
        r'odd="[\"a b\",\"c\"]" bad=nan'
    )


def test_log_event_plain(root_logging):
    stream = io.StringIO()
    configure_logging("INFO", "plain", stream=stream)
    log_event(
        logging.getLogger("trainer.finetune.loop"), "epoch_end", phase="head", val_accuracy=0.5
    )
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(" INFO trainer.finetune.loop event=epoch_end phase=head val_accuracy=0.5")
    assert line[:4].isdigit() and "T" in line.split()[0] and line.split()[0].endswith("Z")


def test_log_event_json_from_environment(root_logging, monkeypatch):
    monkeypatch.setenv("TRAINER_LOG_FORMAT", "json")
    stream = io.StringIO()
    configure_logging(logging.INFO, None, stream=stream)
    logger = logging.getLogger("trainer.finetune.loop")
    log_event(logger, "epoch_end", phase="finetune", loss=np.float64(0.5), lrs=[1e-4, 1e-3])
    logger.warning("skipped %d corrupt files", 2)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "epoch_end"
    assert first["phase"] == "finetune"
    assert first["loss"] == 0.5
    assert first["lrs"] == [1e-4, 1e-3]
    assert first["level"] == "INFO" and first["logger"] == "trainer.finetune.loop"
    assert second["message"] == "skipped 2 corrupt files"
    assert second["level"] == "WARNING"


def test_configure_logging_replaces_its_own_handler(root_logging):
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "plain", stream=first)
    configure_logging("INFO", "json", stream=second)
    log_event(logging.getLogger("t"), "ping")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["event"] == "ping"


def test_bad_format_and_level_are_named(root_logging, monkeypatch):
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "xml")
    monkeypatch.setenv("TRAINER_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="TRAINER_LOG_FORMAT"):
        configure_logging("INFO")
    with pytest.raises(ValueError, match="log level"):
        configure_logging("LOUD", "plain")
    with pytest.raises(ValueError, match="event name"):
        log_event(logging.getLogger("t"), "two words")
