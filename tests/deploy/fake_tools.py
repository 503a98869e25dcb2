"""Stand-ins for the host tools the container recipe calls, for test_container_scripts.py.

Run as ``python fake_tools.py TOOL ARGS...`` from a small wrapper named TOOL on PATH. Every call
is appended to $FAKE_TOOLS_LOG as one JSON line ({"tool": ..., "args": [...]}); the tool then
does just enough for its caller to carry on: podman prints the ids, sizes and ports the scripts
parse and writes the files a training run would export; debootstrap makes a tiny root
filesystem; the client answers health checks and classifies each image as its folder's class.
Standard library only: the scripts under test run it many times.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

IMAGE_SIZE_BYTES = 638_000_000
VAL_CLASSES = ("circle", "square")


def record(tool: str, args: list[str]) -> None:
    with open(os.environ["FAKE_TOOLS_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps({"tool": tool, "args": args}) + "\n")


def subcommand(args: list[str]) -> tuple[str, list[str]]:
    """Splits off the global flags (``--flag=value`` form only) before the engine's command."""
    for index, arg in enumerate(args):
        if not arg.startswith("-"):
            return arg, args[index + 1 :]
    return "", []


def mounts(args: list[str]) -> dict[str, Path]:
    """Container path -> host path for every ``-v HOST:CONTAINER[:ro]``."""
    found = {}
    for flag, value in itertools.pairwise(args):
        if flag in ("-v", "--volume"):
            host, container = value.split(":")[:2]
            found[container] = Path(host)
    return found


def fake_run(args: list[str]) -> int:
    if "-d" in args:
        print("0123456789ab")
        return 0
    volumes = mounts(args)
    if "/data" in volumes:  # make-demo-data: a few validation images
        for name in VAL_CLASSES:
            folder = volumes["/data"] / "demo" / "target" / "val" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "0.png").write_bytes(b"png")
    if "/outputs" in volumes:  # trainer train: the exported model
        model = volumes["/outputs"] / "model_repository" / "classifier" / "1" / "model.onnx"
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_bytes(b"onnx" * 512)
    return 0


def fake_engine(args: list[str]) -> int:
    command, rest = subcommand(args)
    if command == "import":
        sys.stdin.buffer.read()
        print("sha256:" + "0" * 64)
    elif command == "image" and rest[:1] == ["inspect"]:
        print(IMAGE_SIZE_BYTES)
    elif command == "image" and rest[:1] == ["ls"]:
        print("REPOSITORY TAG IMAGE ID CREATED SIZE")
    elif command == "run":
        return fake_run(rest)
    elif command == "port":
        print(f"127.0.0.1:{os.environ['FAKE_PORT']}")
    elif command == "inspect":
        template = rest[rest.index("-f") + 1] if "-f" in rest else ""
        print({"{{.State.Running}}": "true", "{{.State.ExitCode}}": "0"}.get(template, "healthy"))
    return 0


def fake_debootstrap(args: list[str]) -> int:
    positional = [arg for arg in args if not arg.startswith("-")]
    rootfs = Path(positional[1])
    for folder in ("etc/apt", "usr/bin", "var/lib/apt/lists", "tmp"):
        (rootfs / folder).mkdir(parents=True, exist_ok=True)
    (rootfs / "usr/bin/python3").write_text("#!/bin/sh\n")
    return 0


def fake_client(args: list[str]) -> int:
    if args[:1] == ["classify"]:
        for path in args[3:]:
            print(f"{path}\t{Path(path).parent.name}\t0.900")
    return 0


def fake_id(args: list[str]) -> int:
    # build.sh insists on root (debootstrap needs it); the fake debootstrap does not.
    if args == ["-u"]:
        print(0)
        return 0
    os.execvp("/usr/bin/id", ["id", *args])
    return 1


def main() -> int:
    tool, args = sys.argv[1], sys.argv[2:]
    record(tool, args)
    handlers = {"debootstrap": fake_debootstrap, "client": fake_client, "id": fake_id}
    return handlers.get(tool, fake_engine if tool in ("podman", "docker") else lambda _: 0)(args)


if __name__ == "__main__":
    sys.exit(main())
