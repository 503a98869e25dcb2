"""Each file format is parsed by its owner in ``contracts`` only, read from the source (ast).

``model.json`` is ``contracts.model_metadata``'s: a second module that parses JSON and names
the file is a second reader, the way the server and ``trainer evaluate`` once drifted apart
(one accepted empty labels, only one read the temperature). A capture's sidecar name is
``contracts.capture_files.sidecar_path``'s: a module spelling the ``.json`` suffix itself is a
second copy of the rule. The layered settings (defaults < file < environment < flags) are
``contracts.settings.SettingsLoader``'s: a second module that parses a settings file and reads
the environment is a second loader, with its own words for booleans and its own precedence.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contracts", "trainer", "server", "client")
MODEL_JSON_OWNER = "contracts/model_metadata.py"
SIDECAR_OWNER = "contracts/capture_files.py"
SETTINGS_OWNER = "contracts/settings.py"
# The functions that parse a settings file, by the module they come from.
SETTINGS_PARSERS = {
    "yaml": (
        "load",
        "safe_load",
        "full_load",
        "unsafe_load",
        "load_all",
        "safe_load_all",
        "full_load_all",
        "unsafe_load_all",
    ),
    "tomllib": ("load", "loads"),
}


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


def calls_function(tree: ast.Module, module: str, functions: tuple[str, ...]) -> bool:
    """Calls one of ``module``'s ``functions``: ``module.f``, through ``import module as m``, or
    as imported with ``from module import f`` (under any name)."""
    module_names = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name == module
    }
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
        if alias.name in functions
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if (
            isinstance(function, ast.Attribute)
            and function.attr in functions
            and isinstance(function.value, ast.Name)
            and function.value.id in module_names | {module}
        ):
            return True
        if isinstance(function, ast.Name) and function.id in imported:
            return True
    return False


def parses_json(tree: ast.Module) -> bool:
    """Calls ``json.load``/``json.loads`` (or the functions imported from ``json``)."""
    return calls_function(tree, "json", ("load", "loads"))


def reads_model_json(tree: ast.Module) -> bool:
    """Parses JSON and names ``model.json`` (the literal or the layout's constant)."""
    names_the_file = "model.json" in _strings(tree) or "METADATA_FILENAME" in _names(tree)
    return names_the_file and parses_json(tree)


def builds_sidecar_name(tree: ast.Module) -> bool:
    """Spells the sidecar's ``.json`` suffix, or composes a name with the owner's constant."""
    return ".json" in _strings(tree) or "SIDECAR_SUFFIX" in _names(tree)


def loads_layered_settings(tree: ast.Module) -> bool:
    """Parses a settings file (YAML or TOML) and reads the environment (``os.environ``,
    ``getenv``, or an ``environ`` mapping handed in): the two halves of a layered loader."""
    parses_a_file = any(
        calls_function(tree, module, functions) for module, functions in SETTINGS_PARSERS.items()
    )
    return parses_a_file and bool({"environ", "environb", "getenv"} & _names(tree))


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


def test_only_the_owner_loads_layered_settings() -> None:
    loaders = [name for name, tree in _sources().items() if loads_layered_settings(tree)]
    assert loaders == [SETTINGS_OWNER], (
        "describe the settings as a frozen dataclass and read them with "
        "contracts.settings.SettingsLoader (read, or read_file/read_environment), not a "
        "yaml.safe_load and an environment lookup of your own"
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


@pytest.mark.parametrize(
    "source",
    [
        "import os\nimport yaml\nraw = yaml.safe_load(path.read_text()) or {}\n"
        "raw.update({k[8:].lower(): v for k, v in os.environ.items()\n"
        "            if k.startswith('TRAINER_')})\n",
        "from os import getenv\nfrom yaml import safe_load as parse\n"
        "port = getenv('SERVER_GRPC_PORT') or parse(stream)['grpc_port']\n",
        "import yaml as y\ndef load(path, environ):\n"
        "    settings = y.load(path.open(), Loader=y.SafeLoader)\n"
        "    settings.update(environ)\n    return settings\n",
        "import os, tomllib\nsettings = tomllib.loads(text) | dict(os.environ)\n",
    ],
)
def test_a_second_settings_loader_is_seen(source: str) -> None:
    assert loads_layered_settings(ast.parse(source))


@pytest.mark.parametrize(
    "source",
    [
        "import os\nimport yaml\nyaml.safe_dump(config, stream)\nhome = os.environ['HOME']\n",
        "import os\nfrom contracts.settings import SettingsLoader\nenviron = os.environ\n"
        "path = environ.get('SERVER_CONFIG')\n"
        "given = LOADER.read(file=path, environ=environ, flags=flags)\n",
        "import yaml\nmanifest = yaml.safe_load(text)\n",
    ],
)
def test_writing_settings_or_using_the_loader_is_not_loading(source: str) -> None:
    assert not loads_layered_settings(ast.parse(source))
