"""The container scripts hand the same engine settings to every engine call.

The documented recipe (the marked block in deploy/README.md) runs as written, in bash, with
stand-ins for podman, debootstrap, apt-get, `id` and the client on PATH (fake_tools.py): they
record their arguments and answer at once, so no engine, registry or root is needed. What
is tested is the scripts' own plumbing: every podman call carries ENGINE_FLAGS, every build
BUILD_FLAGS and BASE_IMAGE, every run RUN_FLAGS, whichever script (or script run by a script)
makes the call, and from the very first call on, the base image's import included.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE_TOOLS = Path(__file__).resolve().parent / "fake_tools.py"
RECIPE_MARKER = "<!-- recipe: tests/deploy/test_container_scripts.py runs this block -->"
FAKED = ("podman", "debootstrap", "apt-get", "id", "client")
# Settings the caller's environment must not leak into a run.
SETTINGS = (
    "ENGINE",
    "ENGINE_FLAGS",
    "BUILD_FLAGS",
    "RUN_FLAGS",
    "BASE_IMAGE",
    "BASE_TAG",
    "TAG",
    "TRAIN_IMAGE",
    "SERVE_IMAGE",
    "SKIP_BUILD",
    "KEEP_IMAGES",
    "MAKEFLAGS",
    "MAKELEVEL",
    "MFLAGS",
)
METRICS = b'inference_requests_total{model="classifier",outcome="success"} 2\n'


@dataclass(frozen=True)
class Call:
    tool: str
    args: list[str]

    @property
    def command(self) -> str:
        """The engine subcommand: the first argument that is not a global flag."""
        return next((arg for arg in self.args if not arg.startswith("-")), "")


@dataclass(frozen=True)
class FakeHost:
    env: dict[str, str]
    log: Path
    tmp: Path

    def run(self, script: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env={**self.env, **extra_env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def calls(self, tool: str | None = None) -> list[Call]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        found = [Call(**json.loads(line)) for line in lines]
        return [call for call in found if tool is None or call.tool == tool]


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(METRICS)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_host(tmp_path: Path) -> Iterator[FakeHost]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in FAKED:
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TOOLS}" {tool} "$@"\n')
        wrapper.chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # The smoke test reads /metrics over HTTP from the port the engine reports.
    metrics = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=metrics.serve_forever, daemon=True).start()
    env = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        TMPDIR=str(tmp),
        FAKE_TOOLS_LOG=str(tmp_path / "calls.jsonl"),
        FAKE_PORT=str(metrics.server_address[1]),
        CLIENT=str(bin_dir / "client"),
    )
    yield FakeHost(env=env, log=tmp_path / "calls.jsonl", tmp=tmp)
    metrics.shutdown()
    metrics.server_close()


def documented_recipe() -> str:
    text = (ROOT / "deploy" / "README.md").read_text()
    assert RECIPE_MARKER in text, "deploy/README.md lost its recipe marker"
    after = text.split(RECIPE_MARKER, 1)[1]
    match = re.match(r"\s*```bash\n(.*?)```", after, re.DOTALL)
    assert match, "the recipe marker must be followed by a ```bash block"
    return match.group(1)


def contains_run(args: list[str], words: list[str]) -> bool:
    """Whether `words` appear in `args` as one contiguous run."""
    return any(args[i : i + len(words)] == words for i in range(len(args) - len(words) + 1))


def assert_settings_everywhere(
    calls: list[Call], engine_flags: list[str], build_flags: list[str], run_flags: list[str]
) -> None:
    assert calls, "no engine call was made"
    for call in calls:
        assert call.args[: len(engine_flags)] == engine_flags, f"without ENGINE_FLAGS: {call.args}"
    for call in calls:
        if call.command == "build":
            assert contains_run(call.args, build_flags), f"build without BUILD_FLAGS: {call.args}"
        if call.command == "run":
            assert contains_run(call.args, run_flags), f"run without RUN_FLAGS: {call.args}"


def base_image_args(calls: list[Call]) -> list[str]:
    """The BASE_IMAGE build argument of every build, in order."""
    return [
        value
        for call in calls
        if call.command == "build"
        for flag, value in itertools.pairwise(call.args)
        if flag == "--build-arg" and value.startswith("BASE_IMAGE=")
    ]


def test_documented_recipe_passes_settings_to_every_engine_call(fake_host: FakeHost) -> None:
    recipe = documented_recipe()
    # After the recipe, report the settings it exported, to hold the calls against them.
    result = fake_host.run(
        recipe + '\nprintf "%s\\n" "$ENGINE_FLAGS" "$BUILD_FLAGS" "$RUN_FLAGS" "$BASE_IMAGE"\n'
    )
    assert result.returncode == 0, result.stdout + result.stderr
    engine_flags, build_flags, run_flags, base_image = result.stdout.splitlines()[-4:]
    assert "--runtime=runc" in engine_flags.split()
    assert base_image.startswith("localhost/")

    installed = fake_host.calls("apt-get")[-1].args
    assert {"podman", "runc", "debootstrap"} <= set(installed)
    calls = fake_host.calls("podman")
    assert_settings_everywhere(
        calls, shlex.split(engine_flags), shlex.split(build_flags), shlex.split(run_flags)
    )
    commands = [call.command for call in calls]
    # The base image is imported (with the flags) before anything is built from it.
    assert commands.index("import") < commands.index("build")
    assert calls[commands.index("import")].args[-1] == base_image
    builds = [call for call in calls if call.command == "build"]
    assert [call.args[call.args.index("--file") + 1] for call in builds] == [
        "Dockerfile.serve",
        "Dockerfile.train",
    ]
    assert base_image_args(calls) == [f"BASE_IMAGE={base_image}"] * 2
    assert "PASSED" in result.stdout
    assert "classified 2 val images" in result.stdout
    # Without KEEP_IMAGES the smoke test prunes what rebuilds leave behind.
    assert any(contains_run(call.args, ["image", "prune"]) for call in calls)


def test_smoke_rebuild_uses_the_settings_of_make_images(fake_host: FakeHost) -> None:
    settings = {
        "ENGINE": "podman",
        "ENGINE_FLAGS": "--storage-driver=vfs --runtime=runc --log-level=error",
        "BUILD_FLAGS": "--ulimit nofile=1024:1024 --layers=false",
        "RUN_FLAGS": "--ulimit nofile=1024:1024 --pids-limit=512",
        "BASE_IMAGE": "localhost/test-base:1",
        "KEEP_IMAGES": "1",
    }
    result = fake_host.run("make --no-print-directory smoke-containers", **settings)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = fake_host.calls("podman")
    assert_settings_everywhere(
        calls,
        settings["ENGINE_FLAGS"].split(),
        settings["BUILD_FLAGS"].split(),
        settings["RUN_FLAGS"].split(),
    )
    # Both builds come from build-images.sh, run by the smoke test as a child process.
    assert base_image_args(calls) == ["BASE_IMAGE=localhost/test-base:1"] * 2
    assert "kept dangling images and the build cache (KEEP_IMAGES=1)" in result.stdout
    assert not [call for call in calls if "prune" in call.args]


def test_clean_images_removes_images_and_build_cache(fake_host: FakeHost) -> None:
    cache = fake_host.tmp / "buildah-cache-0"
    (cache / "uv").mkdir(parents=True)
    engine_flags = "--storage-driver=overlay --runtime=runc"
    result = fake_host.run(
        "make --no-print-directory clean-images", ENGINE="podman", ENGINE_FLAGS=engine_flags
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = fake_host.calls("podman")
    assert_settings_everywhere(calls, engine_flags.split(), [], [])
    removed = [call.args[-1] for call in calls if call.command == "rmi"]
    assert removed == ["finetune-server:0.1.0", "finetune-trainer:0.1.0"]
    assert any(call.command == "image" and "prune" in call.args for call in calls)
    assert not cache.exists()


@pytest.mark.parametrize("dockerfile", ["Dockerfile.serve", "Dockerfile.train"])
def test_default_base_images_are_fully_qualified(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE)
    assert default, f"{dockerfile} has no BASE_IMAGE default"
    registry = default.group(1).split("/")[0]
    # podman refuses short names (nvidia/cuda:...) without a search registry configured.
    assert "." in registry or registry == "localhost", default.group(1)


def test_one_recipe_in_one_place() -> None:
    recipe = documented_recipe()
    lines = recipe.splitlines()
    first_engine_use = next(i for i, line in enumerate(lines) if "base-image/build.sh" in line)
    exports = [i for i, line in enumerate(lines) if re.match(r"export .*ENGINE_FLAGS=", line)]
    assert exports and exports[0] < first_engine_use, "settings must be exported first"
    for copy in ("README.md", "docs/containers.md", "docs/benchmarks.md"):
        text = (ROOT / copy).read_text()
        assert "deploy/README.md" in text, f"{copy} must link to the recipe"
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
        assert not [b for b in blocks if "base-image/build.sh" in b], f"{copy} repeats the recipe"


def test_make_smoke_containers_with_client_set_needs_no_venv() -> None:
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", "smoke-containers"],
        cwd=ROOT,
        env={**os.environ, "CLIENT": "/bin/true"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "bash deploy/smoke-containers.sh"
