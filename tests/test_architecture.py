"""The house as designed: which module may import what, read from the source (ast).

Every import counts, including those under ``TYPE_CHECKING`` and inside functions: a back edge
that is hidden from the interpreter is still a back edge for the reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contracts", "trainer", "server", "client")
# The generated protobuf stubs (protos/generate.py): a package of their own, left out of the
# graph, which both the server's edge and the client import.
STUBS = "protocol"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def source_modules() -> dict[str, Path]:
    """Every module of our packages (the generated protobuf stubs excluded), by dotted name."""
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _is_package(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").is_file()


def _imported_names(name: str, path: Path) -> Iterable[str]:
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import module` is an edge to the module; `from module import name`
            # an edge to the module that holds the name.
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in source_modules() else base


@cache
def imports_of(name: str) -> frozenset[str]:
    """Dotted names a module imports (modules, and names inside modules)."""
    return frozenset(_imported_names(name, source_modules()[name]))


@cache
def internal_edges(name: str) -> frozenset[str]:
    """Our modules that ``name`` imports directly (a package's ``__init__`` is not implied)."""
    modules = source_modules()
    return frozenset(i for i in imports_of(name) if i in modules and i != name)


def reachable(name: str) -> set[str]:
    """``name`` and every one of our modules it imports, transitively."""
    seen, todo = {name}, [name]
    while todo:
        for child in internal_edges(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _top_levels(name: str) -> set[str]:
    return {i.split(".")[0] for i in imports_of(name)}


def _in(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def test_the_graph_sees_the_packages() -> None:
    # Guards the other tests against passing on an empty graph.
    modules = source_modules()
    assert {
        "trainer.run",
        "server.app",
        "server.batching",
        "client.cli",
        "contracts.preprocessing",
        "contracts.oip_datatypes",
    } <= set(modules)
    assert "trainer.run" in reachable("trainer.cli")
    assert "client.api" in reachable("client.cli")


def test_protobuf_stays_at_the_servers_edge_and_in_the_client() -> None:
    allowed = ("server.transport", "server.app", "client")
    offenders = {
        name: sorted(i for i in imports_of(name) if "_pb2" in i or _in(i, STUBS))
        for name in source_modules()
        if not _in(name, *allowed)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_stubs_import_only_protobuf_grpc_and_each_other() -> None:
    # The server and the client both import the stubs, so the stubs import neither.
    stubs = sorted((ROOT / STUBS).rglob("*.py"))
    assert len(stubs) > 5
    top_levels = set()
    for path in stubs:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                top_levels |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                top_levels.add((node.module or "").split(".")[0])
    assert top_levels <= {STUBS, "google", "grpc", "warnings"}


def test_aiohttp_stays_at_the_servers_edge() -> None:
    # The HTTP/REST listener is a transport like gRPC: handlers never see aiohttp's types.
    users = sorted(n for n in source_modules() if "aiohttp" in _top_levels(n))
    assert users, "no module imports aiohttp"
    assert [n for n in users if not _in(n, "server.transport")] == []


def _grpc_users(name: str) -> list[str]:
    return sorted(
        m
        for m in reachable(name)
        if {"grpc", "grpc_health", "grpc_reflection"} & _top_levels(m)
        or any("_pb2" in i for i in imports_of(m))
    )


def test_batcher_and_onnxruntime_sessions_know_no_grpc() -> None:
    session_modules = [
        n for n in source_modules() if _in(n, "server") and "onnxruntime" in _top_levels(n)
    ]
    assert session_modules, "no server module imports onnxruntime"
    for name in ["server.batching", *session_modules]:
        assert _grpc_users(name) == [], name


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str) -> None:
    names = [n for n in source_modules() if _in(n, package)]
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for child in sorted(internal_edges(name)):
            if state.get(child) == 1:
                cycles.append([*path[path.index(child) :], child])
            elif child not in state:
                visit(child, [*path, child])
        state[name] = 2

    for name in names:
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_halves_import_only_what_they_may() -> None:
    forbidden = {
        "contracts": {
            *("torch", "torchvision", "onnx", "onnxruntime", "grpc", "google", STUBS),
            *("trainer", "server", "client"),
        },
        "trainer": {"server", "client", "grpc", STUBS},
        "server": {"torch", "torchvision", "trainer", "client"},
        # The client is a program of its own: the base install (grpc, protobuf, numpy, pillow).
        "client": {"server", "trainer", "onnxruntime", "torch", "torchvision", "prometheus_client"},
    }
    found = {}
    for prefix, banned in forbidden.items():
        for name in source_modules():
            if _in(name, prefix):
                bad = set().union(*(_top_levels(m) for m in reachable(name))) & banned
                if bad:
                    found[name] = sorted(bad)
    assert found == {}


@pytest.mark.parametrize(
    ("root", "composers"),
    # The client's command module is its own composition root, run by the console script only.
    [("trainer.run", ["trainer.cli"]), ("server.app", ["server.cli"]), ("client.cli", [])],
)
def test_one_composition_root(root: str, composers: list[str]) -> None:
    importers = sorted(n for n in source_modules() if root in imports_of(n) and n != root)
    assert importers == composers


def test_the_servers_domain_does_not_import_its_transport() -> None:
    # Dependencies point inward: the transport adapts the domain, never the other way round.
    edge = ("server.transport", "server.app", "server.cli")
    offenders = {
        name: sorted(i for i in internal_edges(name) if _in(i, "server.transport"))
        for name in source_modules()
        if _in(name, "server") and not _in(name, *edge)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# The trainer's rooms, lowest first (docs/architecture.md draws them). A module imports from
# its own room and the rooms below it, never above: the head phase cannot reach into the
# stages that call it, and nothing but the commands' layer sees the run.
TRAINER_ROOMS = (
    ("trainer.errors", "trainer.progress", "trainer.augment_defaults"),
    ("trainer.config", "trainer.checkpoint"),
    ("trainer.job",),
    ("trainer.data",),
    ("trainer.evaluation",),
    ("trainer.model",),
    ("trainer.head",),
    ("trainer.finetune",),
    ("trainer.export",),
    ("trainer.stages",),
    ("trainer.run", "trainer.commands"),
    ("trainer.cli", "trainer.entrypoint", "trainer.__main__"),
)


def _trainer_room(name: str) -> int:
    rooms = [i for i, room in enumerate(TRAINER_ROOMS) if _in(name, *room)]
    assert rooms, f"{name} is in none of the trainer's rooms: add it to TRAINER_ROOMS"
    return rooms[0]


def test_every_trainer_module_has_a_room_and_imports_only_downward() -> None:
    modules = [n for n in source_modules() if _in(n, "trainer") and n != "trainer"]
    assert len(modules) > 50
    upward = {
        name: sorted(
            i
            for i in internal_edges(name)
            if _in(i, "trainer") and i != "trainer" and _trainer_room(i) > _trainer_room(name)
        )
        for name in modules
    }
    assert {k: v for k, v in upward.items() if v} == {}


def test_the_trainer_folder_holds_rooms_not_loose_modules() -> None:
    # A newcomer finds a concept by its folder: only the base and the entry points stay loose.
    loose = sorted(n for n in source_modules() if n.count(".") == 1 and _in(n, "trainer"))
    allowed = {name for room in (*TRAINER_ROOMS[:2], *TRAINER_ROOMS[-2:]) for name in room}
    assert [n for n in loose if n not in allowed and not _is_package(n)] == []


@pytest.mark.parametrize("name", ["server.model_manager", "server.version_loader"])
def test_the_model_manager_and_the_loader_get_their_settings_from_the_root(name: str) -> None:
    # server.app hands each its own settings (ManagerSettings, LoadSettings), not ServerConfig.
    assert "server.config" not in internal_edges(name)
