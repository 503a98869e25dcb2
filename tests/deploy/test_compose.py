"""deploy/compose.yaml runs on podman as well as docker, and agrees with the programs it runs.

Static checks of what a podman-compose 1.0.3 run on a fresh host tripped over: short image
names, podman's default open-file limit, the build secret, the HTTP port, the wait for a
training run that succeeded. The trainer's arguments and the server's environment parse with
the programs' own parsers, as for the Kubernetes manifests.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
README = DEPLOY / "README.md"
# ${NAME:-default}: compose's interpolation, resolved here to its default.
VARIABLE = re.compile(r"\$\{(\w+):-([^}]*)\}")
# Podman's own defaults (1048576 open files, 4194304 processes) are what a restricted host
# refuses; a stated limit at most this high starts there.
MAX_LIMIT = 65536


def resolve_defaults(value: Any) -> Any:
    """The compose file's values with every ``${NAME:-default}`` at its default."""
    if isinstance(value, str):
        return VARIABLE.sub(lambda match: match.group(2), value)
    if isinstance(value, list):
        return [resolve_defaults(item) for item in value]
    if isinstance(value, dict):
        return {key: resolve_defaults(item) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return resolve_defaults(yaml.safe_load(COMPOSE.read_text()))


def is_fully_qualified(image: str) -> bool:
    """Whether the name starts with a registry host, as podman needs without search registries."""
    first, _, rest = image.partition("/")
    return bool(rest) and (first == "localhost" or "." in first or ":" in first)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("localhost/finetune-server:0.1.0", True),
        ("docker.io/nvidia/cuda:13.0.2-base-ubuntu24.04", True),
        ("registry:5000/finetune-server:0.1.0", True),
        ("finetune-server:0.1.0", False),
        ("library/finetune-server:0.1.0", False),
    ],
)
def test_fully_qualified_rule(image: str, expected: bool) -> None:
    assert is_fully_qualified(image) is expected


def test_every_image_is_fully_qualified(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert is_fully_qualified(service["image"]), name


def test_default_base_images_are_the_dockerfiles(compose: dict[str, Any]) -> None:
    """The compose file states each build's base (the variable needs a default there), and it
    is the Dockerfile's own, fully qualified."""
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        dockerfile = (DEPLOY.parent / service["build"]["dockerfile"]).read_text()
        default = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
        assert default is not None, name
        assert service["build"]["args"]["BASE_IMAGE"] == default.group(1), name
        assert is_fully_qualified(default.group(1)), name


def test_training_runs_the_image_the_demo_data_service_builds(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # podman-compose builds only services with a build section; train has none of its own.
    assert "build" not in services["train"]
    assert services["train"]["image"] == services["demo-data"]["image"]
    assert services["demo-data"]["build"]["dockerfile"] == "Dockerfile.train"
    assert services["serve"]["build"]["dockerfile"] == "Dockerfile.serve"


@pytest.mark.parametrize("limit", ["nofile", "nproc"])
def test_every_service_limits_open_files_and_processes(compose: dict[str, Any], limit: str) -> None:
    for name, service in compose["services"].items():
        value = service["ulimits"][limit]
        assert 1024 <= value["soft"] <= value["hard"] <= MAX_LIMIT, name


def test_builds_get_the_ca_bundle_as_a_secret(compose: dict[str, Any]) -> None:
    assert compose["secrets"]["ca"]["file"] == "/etc/ssl/certs/ca-certificates.crt"
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["build"]["secrets"] == ["ca"], name


def test_serve_waits_for_training_to_succeed(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["serve"]["depends_on"] == {
        "train": {"condition": "service_completed_successfully"}
    }
    assert services["train"]["depends_on"] == {
        "demo-data": {"condition": "service_completed_successfully"}
    }


def test_training_arguments_parse_and_export_where_the_server_reads(
    compose: dict[str, Any],
) -> None:
    from trainer.cli import build_parser
    from trainer.config import FIELDS, resolve_config

    train = compose["services"]["train"]
    args = build_parser().parse_args(train["command"])
    assert args.command == "train"
    flags = {field: getattr(args, field) for field in FIELDS if hasattr(args, field)}
    config = resolve_config(environ={}, flags=flags)
    assert config.resume == "auto"
    assert config.output is not None
    repository = config.repository or config.output / "model_repository"
    serve = compose["services"]["serve"]
    assert Path(serve["environment"]["SERVER_MODEL_REPOSITORY"]) == repository
    assert f"outputs:{config.output}" in train["volumes"]
    assert f"outputs:{config.output}:ro" in serve["volumes"]


def test_serve_publishes_every_listener_on_localhost(compose: dict[str, Any]) -> None:
    from server.config import load_config

    serve = compose["services"]["serve"]
    config = load_config([], environ={k: str(v) for k, v in serve["environment"].items()})
    listeners = {config.http_port, config.grpc_port, config.metrics_port}
    assert listeners == {8000, 8001, 8002}
    assert sorted(serve["ports"]) == sorted(f"127.0.0.1:{port}:{port}" for port in listeners)


def test_readme_runs_podman_compose_with_what_it_ignores(compose: dict[str, Any]) -> None:
    """podman-compose 1.0.3 needs the flags and the start order the README gives it."""
    readme = README.read_text()
    project = compose["name"]
    assert f"podman-compose -p {project} -f deploy/compose.yaml" in readme
    assert "--format docker --secret id=ca,src=" in readme
    order = [f"podman start --attach {project}_{name}_1" for name in ("demo-data", "train")]
    chain = " && ".join([*order, f"podman start {project}_serve_1"])
    assert chain in " ".join(readme.replace("\\\n", " ").split())
