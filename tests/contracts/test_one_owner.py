"""Each file format is parsed by its owner in ``contracts`` only, read from the source (ast).

``model.json`` is ``contracts.model_metadata``'s: a second module that parses JSON and names
the file is a second reader, the way the server and ``trainer evaluate`` once drifted apart
(one accepted empty labels, only one read the temperature). A capture's sidecar name is
``contracts.capture_files.sidecar_path``'s: a module spelling the ``.json`` suffix itself is a
second copy of the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contracts", "trainer", "server", "client")
MODEL_JSON_OWNER = "contracts/model_metadata.py"
SIDECAR_OWNER = "contracts/capture_files.py"


def _sources() -> dict[str, ast.Module]:
    trees = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            trees[name] = ast.parse(path.read_text(), name)
    return trees


def _names(tree: ast.Module) -> set[str]:
    """Every identifier the module uses: names, attributes, and names it imports."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            found.update(alias.asname or alias.name for alias in node.names)
    return found


def _strings(tree: ast.Module) -> set[str]:
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def parses_json(tree: ast.Module) -> bool:
    """Calls ``json.load``/``json.loads`` (or the functions imported from ``json``)."""
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "json"
        for alias in node.names
        if alias.name in ("load", "loads")
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if (
            isinstance(function, ast.Attribute)
            and function.attr in ("load", "loads")
            and isinstance(function.value, ast.Name)
            and function.value.id == "json"
        ):
            return True
        if isinstance(function, ast.Name) and function.id in imported:
            return True
    return False


def reads_model_json(tree: ast.Module) -> bool:
    """Parses JSON and names ``model.json`` (the literal or the layout's constant)."""
    names_the_file = "model.json" in _strings(tree) or "METADATA_FILENAME" in _names(tree)
    return names_the_file and parses_json(tree)


def builds_sidecar_name(tree: ast.Module) -> bool:
    """Spells the sidecar's ``.json`` suffix, or composes a name with the owner's constant."""
    return ".json" in _strings(tree) or "SIDECAR_SUFFIX" in _names(tree)


def test_only_the_owner_parses_model_json() -> None:
    readers = [name for name, tree in _sources().items() if reads_model_json(tree)]
    assert readers == [MODEL_JSON_OWNER], (
        "read model.json with contracts.model_metadata.read_model_metadata (or "
        "metadata_from_props), not a json.load of your own"
    )


def test_only_the_owner_builds_the_sidecar_name() -> None:
    builders = [name for name, tree in _sources().items() if builds_sidecar_name(tree)]
    assert builders == [SIDECAR_OWNER], (
        "a capture's sidecar is contracts.capture_files.sidecar_path(image); another file "
        "ending in .json deserves a constant holding its whole name"
    )


@pytest.mark.parametrize(
    "source",
    [
        "import json\nfrom contracts.repository_layout import METADATA_FILENAME\n"
        "doc = json.loads((d / METADATA_FILENAME).read_text())\n",
        "import json\ndoc = json.load(open(d / 'model.json'))\n",
        "from json import loads as parse\nfrom contracts import repository_layout as l\n"
        "doc = parse((d / l.METADATA_FILENAME).read_bytes())\n",
    ],
)
def test_a_second_model_json_reader_is_seen(source: str) -> None:
    assert reads_model_json(ast.parse(source))


@pytest.mark.parametrize(
    "source",
    [
        "import json\nMETADATA = 'model.json: what the export wrote'\njson.dumps({})\n",
        "from contracts.model_metadata import read_model_metadata\n"
        "from contracts.repository_layout import METADATA_FILENAME\n"
        "m = read_model_metadata(d / METADATA_FILENAME)\n",
    ],
)
def test_writing_or_using_the_owner_is_not_reading(source: str) -> None:
    assert not reads_model_json(ast.parse(source))


@pytest.mark.parametrize(
    "source",
    [
        "side = image.with_suffix(image.suffix + '.json')\n",
        "from contracts.capture_files import SIDECAR_SUFFIX\n"
        "side = image.with_name(image.name + SIDECAR_SUFFIX)\n",
    ],
)
def test_a_second_sidecar_name_rule_is_seen(source: str) -> None:
    assert builds_sidecar_name(ast.parse(source))
    assert not builds_sidecar_name(ast.parse("side = sidecar_path(image)\n"))
