"""The client's settings from the environment: ``CLIENT_<FLAG>`` is that flag's default.

Read by the one loader the server and the trainer use (``contracts.settings.SettingsLoader``):
the same words for booleans and for "not set", and an error naming the variable for a value of
the wrong type. ``CLIENT_`` is a common prefix, so variables that name no setting are left
alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from contracts.settings import SettingsLoader, SettingValueError

ENV_PREFIX = "CLIENT_"
DEFAULT_TARGET = "localhost:8001"
DEFAULT_TIMEOUT_S: float = 30
DEFAULT_REPOSITORY = Path("models")


@dataclass(frozen=True)
class ClientEnvironment:
    """What the ``CLIENT_*`` variables say; None where a variable is unset or empty.

    Each field is the default of the flag of the same name (``CLIENT_TIMEOUT_S`` ->
    ``--timeout-s``); a flag given on the command line wins.
    """

    target: str | None = None
    tls: bool | None = None
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None
    token_file: Path | None = None
    allow_insecure_token: bool | None = None
    timeout_s: float | None = None
    repository: Path | None = None


LOADER = SettingsLoader(ClientEnvironment, env_prefix=ENV_PREFIX, is_environment_shared=True)


def read_environment(environ: Mapping[str, str]) -> ClientEnvironment:
    """The client's settings in ``environ``.

    Raises:
        SettingError: a value of the wrong type, or a timeout that is not positive, naming the
            variable.
    """
    given = LOADER.read_environment(environ)
    settings = ClientEnvironment(**{name: setting.value for name, setting in given.items()})
    if settings.timeout_s is not None and not settings.timeout_s > 0:
        source = given["timeout_s"].source
        raise SettingValueError(
            "timeout_s", source, environ[source], "a positive number", "not positive"
        )
    return settings
