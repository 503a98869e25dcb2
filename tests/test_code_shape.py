"""The shape of the code, read from the source (ast): no function runs over a screenful.

STYLE.md: "A ``main()`` or a function over ~80 lines is a sign to split." A function's length is
counted from its ``def`` line to its last line, docstring and comments included; a nested
function counts in its own right and in the function around it. The generated protobuf stubs
(``protocol/``) are not ours to shape.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contracts", "trainer", "server", "client")
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _functions(
    node: ast.AST, prefix: str
) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function under ``node`` by its dotted name (module.Class.method, outer.inner)."""
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{child.name}"
            found.append((name, child))
            found.extend(_functions(child, name))
        elif isinstance(child, ast.ClassDef):
            found.extend(_functions(child, f"{prefix}.{child.name}"))
        else:
            found.extend(_functions(child, prefix))
    return found


def function_lengths() -> dict[str, int]:
    """Lines of every function of our packages, by dotted name."""
    lengths = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for name, function in _functions(tree, _module_name(path)):
                assert function.end_lineno is not None
                lengths[name] = function.end_lineno - function.lineno + 1
    return lengths


def test_the_packages_are_read() -> None:
    lengths = function_lengths()
    assert "trainer.run.train" in lengths and "server.app.build_server" in lengths


def test_no_function_is_longer_than_a_screenful() -> None:
    long = {name: lines for name, lines in function_lengths().items() if lines > MAX_FUNCTION_LINES}
    assert not long, f"over {MAX_FUNCTION_LINES} lines (split by concept, STYLE.md): " + ", ".join(
        f"{name} ({lines})" for name, lines in sorted(long.items())
    )
