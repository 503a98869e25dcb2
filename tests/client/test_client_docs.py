"""docs/client.md says what ``client classify`` does: its suffixes, its messages, its JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from server_harness import RunningServer
from test_client_library import solid_png

from client.cli import main
from contracts.image_formats import IMAGE_EXTENSIONS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "client.md").read_text()


def test_the_documented_suffixes_are_the_ones_searched() -> None:
    match = re.search(r"searched recursively for `([^`]+)` files", DOC)
    assert match is not None
    assert set(match.group(1).split()) == set(IMAGE_EXTENSIONS)


def test_the_documented_error_is_what_a_gif_gets(
    running_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gif = tmp_path / "anim.gif"
    gif.write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    assert main(["classify", "--target", running_server.target, str(gif)]) == 1
    message = capsys.readouterr().err.strip().removeprefix(str(tmp_path) + "/")
    assert f"`{message}`" in DOC.replace("\n", " ")


def test_classify_json_names_the_version_that_answered(
    running_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(solid_png((255, 0, 0)))
    assert main(["classify", "--target", running_server.target, "--json", str(image)]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert (result["model"], result["model_version"]) == ("classifier", "1")
    assert set(result) == {"path", "model", "model_version", "predictions", "abstained"}
