"""The README's "Your first model, offline" block stays true: every command in it is accepted
by its program with the values as written (``make first-model`` runs the block itself)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from client.cli import build_parser as client_parser
from server.config import load_config as load_server_config
from trainer.cli import build_parser as trainer_parser
from trainer.config import FIELDS, build_config, given_settings

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- first-model:begin -->\n```bash\n(.*?)```\n<!-- first-model:end -->", re.S)


def _commands() -> list[list[str]]:
    match = BLOCK.search((ROOT / "README.md").read_text())
    assert match, "README.md has no first-model block"
    joined = match.group(1).replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_the_block_goes_from_data_to_a_served_prediction() -> None:
    programs = [(c[0], c[1] if len(c) > 1 else "") for c in _commands()]
    assert programs[:2] == [("make", "venv"), (".venv/bin/trainer", "make-demo-data")]
    assert programs.count((".venv/bin/trainer", "train")) == 2
    assert programs[-2:] == [(".venv/bin/client", "classify"), ("kill", "%1")]
    script = (ROOT / "deploy" / "first-model.sh").read_text()
    assert "first-model:begin" in script  # the make target runs this very block


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c[:2]))
def test_each_command_is_accepted_as_written(command: list[str]) -> None:
    program, args = command[0], [a for a in command[1:] if a != "&"]
    if program == ".venv/bin/trainer":
        parsed = trainer_parser().parse_args(args)
        if args[0] == "train":
            flags = {name: getattr(parsed, name) for name in FIELDS if hasattr(parsed, name)}
            build_config(given_settings(flags=flags, environ={}))
    elif program == ".venv/bin/server":
        load_server_config(args)
    elif program == ".venv/bin/client":
        client_parser().parse_args(args)
    else:
        assert program in {"make", "kill"}, command
