"""The package's import structure keeps DESIGN.md's layering: no import cycle, no import from a lower layer up.

Every ``import`` in ``src/cycle_encoding`` is read with ``ast`` (module level, inside functions and under
``TYPE_CHECKING`` alike: a lazy import is still a dependency), resolved to the package's module it names, and checked
against the layer table below. A package's ``__init__`` counts as a module of its own layer; the implicit import of a
parent package that Python does before a submodule is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cycle_encoding"

# Bottom up (DESIGN.md): a module may import from its own layer or below. The first matching prefix decides, so a
# module is named by its dotted path below cycle_encoding ("" is the package's own __init__, the public API).
LAYERS: list[tuple[str, ...]] = [
    ("ops", "errors", "paths", "config", "utils", "assets", "version", "grid", "progress", "optim", "distributed"),
    ("networks",),
    ("checkpoints", "data", "losses", "metrics", "sampling"),
    ("training", "inversion", "editing"),
    ("report",),
    ("cli", "ui", ""),  # ui: the browser editor (DESIGN.md: "cli, the web editor, scripts")
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (``from X import y`` names module ``X.y`` when that is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                sub = f"{module}.{a.name}"
                targets.add(sub if sub in modules else module)
    out = set()
    for t in targets:
        while t and t not in modules:  # `import cycle_encoding.x.y as z` of a name inside a module
            t = t.rpartition(".")[0]
        if t.startswith(PACKAGE) and t != name:
            out.add(t)
    return out


def layer_of(module: str) -> int:
    rel = module[len(PACKAGE) + 1 :] if module != PACKAGE else ""
    top = rel.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py's LAYERS: add it there")


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read() -> None:
    graph = import_graph()
    # a few edges that must be seen, so that a reader that sees nothing cannot pass
    assert "cycle_encoding.ops" in graph["cycle_encoding.networks.stylegan2"]
    assert "cycle_encoding.errors" in graph["cycle_encoding.config"]
    assert len(graph) > 50


def test_every_module_has_a_layer() -> None:
    for module in import_graph():
        layer_of(module)


def test_no_upward_import() -> None:
    graph = import_graph()
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_the_cycle_finder(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected
