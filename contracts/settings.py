"""How a program's settings are read: the words a value is written in, and the one loader.

The trainer and the server read the same words the same way: ``true/false``, ``yes/no``,
``on/off``, ``1/0`` for booleans, and ``none``/``null``/empty for "not set". Both resolve their
settings object with ``SettingsLoader``: defaults < YAML file < environment < flags, unknown
keys and values of the wrong type refused with an error naming the key and where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
UNSET_WORDS = frozenset({"", "none", "null"})


def is_unset(value: Any) -> bool:
    """None, or a string that means "not set"."""
    return value is None or (isinstance(value, str) and value.strip().lower() in UNSET_WORDS)


def parse_bool(value: Any) -> bool:
    """A boolean from a bool or one of the words above.

    Raises:
        ValueError: for anything else, naming the accepted words.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"expected true/false, yes/no, on/off or 1/0, got {value!r}")


def parse_int(value: Any) -> int:
    """An integer; refuses booleans and fractional numbers instead of truncating them."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def parse_float(value: Any) -> float:
    """A number; refuses booleans."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def positive_int_argument(text: str) -> int:
    """An argparse ``type`` for counts: a positive integer, else a usage error naming the text."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# --- The layered loader: defaults < YAML file < environment < flags --------------------------

# A settings file is a page of YAML; anything larger is a mistake (a wrong path, a data file),
# refused before it is read into memory.
MAX_SETTINGS_FILE_BYTES = 1024 * 1024


class SettingError(ValueError):
    """A setting that cannot be used; the message names the setting and where it came from."""


class SettingsFileError(SettingError):
    """The settings file cannot be read, is too large, is not YAML or not a mapping.

    Attributes:
        path: the file.
        problem: ``unreadable``, ``too large``, ``invalid`` (not UTF-8 YAML) or ``not a mapping``.
        cause: the OSError, UnicodeDecodeError or YAMLError behind ``unreadable``/``invalid``.
    """

    def __init__(self, path: Path, problem: str, cause: Exception | None = None) -> None:
        self.path, self.problem, self.cause = path, problem, cause
        if isinstance(cause, OSError):
            detail = cause.strerror or str(cause)
        elif problem == "too large":
            detail = f"larger than {MAX_SETTINGS_FILE_BYTES // 1024 // 1024} MiB; not read"
        elif problem == "not a mapping":
            detail = "expected a mapping of settings"
        else:
            detail = f"invalid YAML: {cause}"
        super().__init__(f"config file {path}: {detail}")


class UnknownSettingError(SettingError):
    """Keys that name no setting.

    Attributes:
        origin: ``file``, ``environment`` or ``flags``.
        keys: the keys as the user wrote them (``SERVER_GRPC_PROT``, ``--grpc-prot``), in order.
        names: the same keys as setting names (``grpc_prot``).
        path: the file, for ``origin == "file"``.
    """

    def __init__(
        self,
        origin: str,
        keys: Sequence[str],
        names: Sequence[str],
        known: Iterable[str],
        path: Path | None = None,
    ) -> None:
        self.origin, self.keys, self.names, self.path = origin, tuple(keys), tuple(names), path
        if origin == "environment":
            message = f"unknown environment setting {self.keys[0]}"
        else:
            where = f"config file {path}: " if origin == "file" else f"{self.keys[0]}: "
            message = f"{where}unknown setting {self.names[0]!r}; known: {', '.join(sorted(known))}"
        super().__init__(message)


class SettingValueError(SettingError):
    """A value that is not of its setting's type, or empty where the setting needs one.

    Attributes:
        name: the setting.
        source: where the value came from (``SERVER_GRPC_PORT``, ``config file F: grpc_port``).
        value: the value as given.
        expected: what the setting takes, in words (``an integer``).
        reason: what the conversion said; empty when the value is missing.
        is_missing: the value was empty (None, or a word for "not set") and the setting needs one.
    """

    def __init__(
        self, name: str, source: str, value: Any, expected: str, reason: str | None
    ) -> None:
        self.name, self.source, self.value, self.expected = name, source, value, expected
        self.reason, self.is_missing = reason or "", reason is None
        if self.is_missing:
            super().__init__(f"{source} must not be empty")
        else:
            super().__init__(f"{source}: cannot read {value!r} as {expected}")


@dataclass(frozen=True)
class SettingType:
    """What a setting holds: ``base`` (bool, int, float, str, Path, ``tuple[int, ...]`` or
    ``tuple[str, ...]``), and whether None ("not set") is allowed."""

    base: Any
    is_optional: bool

    @property
    def expected(self) -> str:
        """The type in the words an error uses."""
        if typing.get_origin(self.base) is tuple:
            item = typing.get_args(self.base)[0]
            return "a comma-separated list" + (" of integers" if item is int else "")
        return {bool: "true or false", int: "an integer", float: "a number"}.get(self.base, "text")


def setting_types(settings_class: type) -> dict[str, SettingType]:
    """Each field of a settings dataclass, by name, in declaration order."""
    hints = typing.get_type_hints(settings_class)
    types_by_name = {}
    for spec in dataclasses.fields(settings_class):
        hint = hints[spec.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            types_by_name[spec.name] = SettingType(args[0], True)
        else:
            types_by_name[spec.name] = SettingType(hint, False)
    return types_by_name


@dataclass(frozen=True)
class Given:
    """A setting the user gave: its converted value and where it came from."""

    value: Any
    source: str


@dataclass(frozen=True)
class SettingsLoader:
    """Reads one program's settings: a YAML file, then the environment, then flags.

    The loader only converts and names; ranges and choices are the settings class's own
    checks. Keys of the file and of the flags may use ``-`` for ``_``; environment variables
    are ``env_prefix`` + the upper-case name.

    Attributes:
        settings_class: the program's frozen settings dataclass.
        env_prefix: ``SERVER_``, ``TRAINER_``, ...
        ignored_environment: prefixed variables that are not settings (``SERVER_CONFIG``).
        is_environment_shared: the prefix is not the program's alone (``CLIENT_``), so a
            variable that names no setting is left alone instead of refused.
        file_source: how a file's value is named in errors, from ``{path}`` and ``{name}``.
        flag_source: how a flag's value is named in errors: ``{name}`` (``grpc_port``) or
            ``{flag}`` (``--grpc-port``).
        words: per setting, words that stand for a value (``{"lr": {"auto": None}}``).
        expand_home: paths starting with ``~`` are in the user's home.
        text_from_scalars: a text setting takes a YAML scalar that is not a string (a number, a
            boolean, a date) as its text; a list or a mapping is still an error.
    """

    settings_class: type
    env_prefix: str
    ignored_environment: frozenset[str] = frozenset()
    is_environment_shared: bool = False
    file_source: str = "config file {path}: {name}"
    flag_source: str = "{name}"
    words: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    expand_home: bool = False
    text_from_scalars: bool = False

    @functools.cached_property
    def types(self) -> dict[str, SettingType]:
        """Each setting's type, by name, in declaration order."""
        return setting_types(self.settings_class)

    def convert(self, name: str, value: Any, source: str) -> Any:
        """``value`` (a YAML value, an environment string or a flag) as the setting's type.

        Raises:
            SettingValueError: naming ``source``.
        """
        kind = self.types[name]
        table = self.words.get(name, {})
        if isinstance(value, str) and value.strip().lower() in table:
            return table[value.strip().lower()]
        if value is None or (kind.is_optional and is_unset(value)):
            if kind.is_optional:
                return None
            raise SettingValueError(name, source, value, kind.expected, None)
        try:
            return self._convert(kind.base, value)
        except (TypeError, ValueError) as error:
            raise SettingValueError(name, source, value, kind.expected, str(error)) from None

    def _convert(self, base: Any, value: Any) -> Any:
        if typing.get_origin(base) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            texts = [str(item).strip() for item in items]
            if typing.get_args(base)[0] is str:
                return tuple(text for text in texts if text)
            return tuple(parse_int(text) for text in texts if text)
        if base is bool:
            return parse_bool(value)
        if base is int:
            return parse_int(value)
        if base is float:
            return parse_float(value)
        if base is Path:
            path = Path(str(value))
            return path.expanduser() if self.expand_home else path
        if isinstance(value, str):
            return value
        if self.text_from_scalars and not isinstance(value, (Mapping, list, tuple, set)):
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")

    def _check_known(
        self, origin: str, keys: Sequence[str], names: Sequence[str], path: Path | None = None
    ) -> None:
        unknown = [
            (key, name) for key, name in zip(keys, names, strict=True) if name not in self.types
        ]
        if unknown:
            raise UnknownSettingError(
                origin, [k for k, _ in unknown], [n for _, n in unknown], self.types, path
            )

    def read_file(self, path: Path) -> dict[str, Given]:
        """The settings of a YAML file (a mapping; no file, or an empty one, gives none).

        Raises:
            SettingsFileError: unreadable, over ``MAX_SETTINGS_FILE_BYTES``, not YAML, not a
                mapping.
            UnknownSettingError: every key that names no setting.
            SettingValueError: the first value of the wrong type.
        """
        raw = _read_settings_file(Path(path))
        names = [str(key).replace("-", "_") for key in raw]
        self._check_known("file", names, names, path)
        given = {}
        for name, value in zip(names, raw.values(), strict=True):
            source = self.file_source.format(path=path, name=name)
            given[name] = Given(self.convert(name, value, source), source)
        return given

    def read_environment(self, environ: Mapping[str, str]) -> dict[str, Given]:
        """The settings of every ``PREFIX*`` variable not in ``ignored_environment``.

        Raises:
            UnknownSettingError: every variable that names no setting (none when
                ``is_environment_shared``).
            SettingValueError: the first value of the wrong type.
        """
        keys = [
            key
            for key in environ
            if key.startswith(self.env_prefix)
            and key not in self.ignored_environment
            and not (self.is_environment_shared and self._name_of(key) not in self.types)
        ]
        names = [self._name_of(key) for key in keys]
        self._check_known("environment", keys, names)
        return {
            name: Given(self.convert(name, environ[key], key), key)
            for key, name in zip(keys, names, strict=True)
        }

    def _name_of(self, variable: str) -> str:
        return variable[len(self.env_prefix) :].lower()

    def read_flags(self, flags: Mapping[str, Any]) -> dict[str, Given]:
        """The settings given as flags, by setting name (``grpc_port``).

        Raises:
            UnknownSettingError: every flag that names no setting.
            SettingValueError: the first value of the wrong type.
        """
        sources = {
            name: self.flag_source.format(name=name, flag="--" + name.replace("_", "-"))
            for name in flags
        }
        self._check_known("flags", list(sources.values()), list(sources))
        return {
            name: Given(self.convert(name, value, sources[name]), sources[name])
            for name, value in flags.items()
        }

    def read(
        self,
        *,
        file: Path | None,
        environ: Mapping[str, str],
        flags: Mapping[str, Any] | None = None,
    ) -> dict[str, Given]:
        """What the user gave, file < environment < flags, converted; no defaults.

        Raises:
            SettingError: the first problem, naming the setting and where it came from.
        """
        given = self.read_file(file) if file is not None else {}
        given.update(self.read_environment(environ))
        given.update(self.read_flags(flags or {}))
        return given


def _read_settings_file(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as stream:
            # fstat first: a huge file is refused unread; the bounded read catches a file
            # that grows, or one (a pipe, a device) whose size says nothing.
            if os.fstat(stream.fileno()).st_size > MAX_SETTINGS_FILE_BYTES:
                raise SettingsFileError(path, "too large")
            data = stream.read(MAX_SETTINGS_FILE_BYTES + 1)
    except OSError as error:
        raise SettingsFileError(path, "unreadable", error) from None
    if len(data) > MAX_SETTINGS_FILE_BYTES:
        raise SettingsFileError(path, "too large")
    try:
        loaded = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise SettingsFileError(path, "invalid", error) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SettingsFileError(path, "not a mapping")
    return loaded
