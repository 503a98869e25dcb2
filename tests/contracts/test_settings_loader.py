"""The one settings loader: defaults < YAML file < environment < flags, errors that name the key
and where it came from, and a settings file bounded before it is read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from contracts.settings import (
    MAX_SETTINGS_FILE_BYTES,
    SettingError,
    SettingsFileError,
    SettingsLoader,
    SettingValueError,
    UnknownSettingError,
)

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Demo:
    count: int = 1
    ratio: float = 0.5
    name: str = "x"
    path: Path | None = None
    sizes: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    is_on: bool = False
    limit: int | None = None


LOADER = SettingsLoader(Demo, env_prefix="DEMO_", ignored_environment=frozenset({"DEMO_CONFIG"}))


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return path


def test_file_then_environment_then_flags_each_with_its_source(tmp_path: Path) -> None:
    file = _file(tmp_path, "count: 2\nratio: 0.25\nis-on: yes\nsizes: [1, 2]\n")
    environ = {"DEMO_COUNT": "3", "DEMO_NAMES": "a, b,,", "DEMO_CONFIG": "x", "PATH": "/bin"}
    given = LOADER.read(file=file, environ=environ, flags={"count": "4", "limit": "none"})
    values = {name: setting.value for name, setting in given.items()}
    assert values == {
        "count": 4,
        "ratio": 0.25,
        "is_on": True,
        "sizes": (1, 2),
        "names": ("a", "b"),
        "limit": None,
    }
    assert given["count"].source == "count"
    assert given["names"].source == "DEMO_NAMES"
    assert given["ratio"].source == f"config file {file}: ratio"
    assert Demo(**values).count == 4


@pytest.mark.parametrize(
    ("origin", "read", "message"),
    [
        (
            "environment",
            {"environ": {"DEMO_COUNTT": "1"}},
            "unknown environment setting DEMO_COUNTT",
        ),
        ("flags", {"flags": {"countt": "1"}}, "countt: unknown setting 'countt'; known: count,"),
    ],
)
def test_unknown_keys_name_the_key(origin: str, read: dict, message: str) -> None:
    with pytest.raises(UnknownSettingError) as caught:
        LOADER.read(file=None, **{"environ": {}, **read})
    assert caught.value.origin == origin
    assert message in str(caught.value)


def test_every_unknown_file_key_is_named_with_the_file(tmp_path: Path) -> None:
    file = _file(tmp_path, "count: 1\nzeta: 2\nalpha-beta: 3\n")
    with pytest.raises(UnknownSettingError) as caught:
        LOADER.read(file=file, environ={})
    assert caught.value.names == ("zeta", "alpha_beta")
    assert str(caught.value).startswith(f"config file {file}: unknown setting 'zeta'; known: ")


@pytest.mark.parametrize(
    ("text", "environ", "flags", "message"),
    [
        ("count: many\n", {}, {}, "config file {file}: count: cannot read 'many' as an integer"),
        ("", {"DEMO_RATIO": "half"}, {}, "DEMO_RATIO: cannot read 'half' as a number"),
        ("", {}, {"is_on": "perhaps"}, "is_on: cannot read 'perhaps' as true or false"),
        (
            "",
            {},
            {"sizes": "1,x"},
            "sizes: cannot read '1,x' as a comma-separated list of integers",
        ),
        ("name: [1]\n", {}, {}, "config file {file}: name: cannot read [1] as text"),
        ("count: 2.5\n", {}, {}, "config file {file}: count: cannot read 2.5 as an integer"),
        ("count: true\n", {}, {}, "config file {file}: count: cannot read True as an integer"),
        ("count: null\n", {}, {}, "config file {file}: count must not be empty"),
        ("", {"DEMO_COUNT": ""}, {}, "DEMO_COUNT: cannot read '' as an integer"),
    ],
)
def test_mistyped_values_name_the_key_and_the_source(
    tmp_path: Path, text: str, environ: dict, flags: dict, message: str
) -> None:
    file = _file(tmp_path, text)
    with pytest.raises(SettingValueError) as caught:
        LOADER.read(file=file, environ=environ, flags=flags)
    assert str(caught.value) == message.format(file=file)


def test_flag_source_words_and_paths_are_the_programs_choice(tmp_path: Path) -> None:
    loader = SettingsLoader(
        Demo,
        env_prefix="DEMO_",
        file_source="{path}: {name}",
        flag_source="{flag}",
        words={"limit": {"auto": None}, "count": {"many": 100}},
        expand_home=True,
        text_from_scalars=True,
    )
    file = _file(tmp_path, "name: 2024\npath: ~/runs\n")
    given = loader.read(file=file, environ={}, flags={"count": " Many", "limit": "auto"})
    assert given["count"].value == 100 and given["limit"].value is None
    assert given["name"].value == "2024"
    assert given["path"].value == Path.home() / "runs"
    assert given["name"].source == f"{file}: name"
    with pytest.raises(SettingValueError, match=r"^--ratio: cannot read 'x' as a number$"):
        loader.read(file=None, environ={}, flags={"ratio": "x"})


@pytest.mark.parametrize(
    ("text", "problem"),
    [("- 1\n- 2\n", "not a mapping"), ("a: [\n", "invalid"), (b"\xff\xfe: 1\n", "invalid")],
)
def test_a_file_that_is_no_mapping_of_settings(
    tmp_path: Path, text: str | bytes, problem: str
) -> None:
    file = tmp_path / "demo.yaml"
    file.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SettingsFileError) as caught:
        LOADER.read(file=file, environ={})
    assert caught.value.problem == problem
    assert str(caught.value).startswith(f"config file {file}: ")


def test_a_missing_or_empty_file(tmp_path: Path) -> None:
    assert LOADER.read(file=_file(tmp_path, ""), environ={}) == {}
    with pytest.raises(SettingsFileError, match="No such file or directory") as caught:
        LOADER.read(file=tmp_path / "missing.yaml", environ={})
    assert isinstance(caught.value.cause, FileNotFoundError)


def test_a_large_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    sparse = tmp_path / "huge.yaml"
    with sparse.open("wb") as stream:
        stream.truncate(64 * MAX_SETTINGS_FILE_BYTES)  # no blocks: only its size says so
    with pytest.raises(SettingsFileError, match="larger than 1 MiB") as caught:
        LOADER.read(file=sparse, environ={})
    assert caught.value.problem == "too large"


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_file_whose_size_says_nothing_is_read_only_up_to_the_bound() -> None:
    assert os.stat("/dev/zero").st_size == 0
    with pytest.raises(SettingsFileError, match="larger than 1 MiB"):
        LOADER.read(file=Path("/dev/zero"), environ={})


def test_errors_are_value_errors_each_program_maps_to_its_own() -> None:
    assert issubclass(SettingError, ValueError)
    for subclass in (SettingsFileError, UnknownSettingError, SettingValueError):
        assert issubclass(subclass, SettingError)


def test_the_loader_is_written_once() -> None:
    # The programs describe their settings; reading a file or the environment is the loader's.
    for module in ("server/config.py", "trainer/config.py"):
        source = (ROOT / module).read_text()
        assert "SettingsLoader(" in source, module
        assert "safe_load" not in source, module
        assert "startswith(ENV_PREFIX)" not in source, module
