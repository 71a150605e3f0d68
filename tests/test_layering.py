"""Layers import only downward: no import cycle between lowbit's top-level subpackages and modules.

Every `import lowbit.x` and `from lowbit.x import ...` in src/lowbit counts, at module level and
inside functions alike (a deferred import is still a dependency; deferring one only hides a cycle
from the interpreter). Imports inside one top-level unit (budget.plan -> budget.costs) are that
unit's own business and are not checked here.
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"

# Top-level files that belong to another unit (module name -> unit); none at present (the CLI's
# flag checks, once cli_checks.py, are cli/checks.py inside the cli package).
PART_OF: dict[str, str] = {}

# Edges known to close a cycle, each to be removed by its own change; anything else fails.
KNOWN: set[tuple[str, str]] = set()


def _units() -> set[str]:
    """The top-level subpackages and modules: lowbit.<unit>."""
    return {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def _unit(name: str) -> str:
    return PART_OF.get(name, name)


def _module_name(path: Path) -> list[str]:
    parts = ["lowbit", *path.relative_to(SRC).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(node: ast.AST, path: Path, units: set[str]) -> list[str]:
    """The lowbit units an import statement names."""
    if isinstance(node, ast.Import):
        return [_unit(a.name.split(".")[1]) for a in node.names if a.name.startswith("lowbit.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolved against the importing module's package
        package = _module_name(path)
        if path.name != "__init__.py":
            package = package[:-1]
        base = package[: len(package) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    parts = module.split(".")
    if parts[0] != "lowbit":
        return []
    if len(parts) > 1:
        return [_unit(parts[1])]
    return [_unit(a.name) for a in node.names if a.name in units]  # from lowbit import kernels


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> where (file:line), for imports between different units."""
    units = _units()
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(SRC.rglob("*.py")):
        parts = _module_name(path)
        if len(parts) < 2:
            continue  # lowbit/__init__.py: its lazy API table names strings, not imports
        unit = _unit(parts[1])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, path, units):
                if target != unit:
                    graph[unit][target].append(f"{path.relative_to(SRC.parent)}:{node.lineno}")
    return graph


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one unit (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_cycle_in(sorted(c), edges) for c in components]


def _cycle_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside a strongly connected component (breadth first)."""
    members, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def test_the_cycle_finder_finds_a_cycle_and_passes_a_chain():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert "algorithms" in graph["pipeline"]                 # module level
    assert "bench" in graph["cli"]                           # inside a function (cli/bench.py)


def test_no_import_cycle_between_top_level_units():
    graph = import_graph()
    edges = {u: {t for t in targets if (u, t) not in KNOWN} for u, targets in graph.items()}
    cycles = find_cycles(edges)
    if cycles:
        lines = []
        for cycle in cycles:
            lines.append(" -> ".join(cycle))
            lines += [f"    {a} -> {b}: {', '.join(graph[a][b][:3])}" for a, b in itertools.pairwise(cycle)]
        pytest.fail("import cycles between lowbit's top-level units:\n" + "\n".join(lines))


@pytest.mark.parametrize("edge", sorted(KNOWN))
def test_each_known_exception_is_still_needed(edge):
    """A known edge that is gone (or no longer closes a cycle) is taken off the list."""
    graph = import_graph()
    a, b = edge
    if b not in graph.get(a, {}):
        pytest.fail(f"{a} -> {b} is no longer imported: remove it from KNOWN")
    edges = {u: set(t) for u, t in graph.items()}
    assert any(a in c and b in c for c in find_cycles(edges)), (
        f"{a} -> {b} no longer closes a cycle: remove it from KNOWN")


# The layers, lowest first: a unit may import only units in lower layers (and itself). A new
# top-level module or package must be placed here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "paths", "dtypes", "methods"),                       # foundations, no lowbit imports
    ("marks", "memory", "levels", "formats", "kernels", "data"),    # primitives: formats, kernel builds, text
    ("qtensor", "outputs", "models", "recipe_sections"),            # the record, safe writes, model loading
    ("recipes", "peers"),                                           # the recipe; other tools' quantizers
    ("algorithms",),                                                # weight + statistics + format -> record
    ("calibration", "checkpoint"),                                  # block-by-block driver; records on disk
    ("budget", "runtime", "blockwise"),                             # size budgets; running records; per-block steps
    ("eval",),                                                      # measuring a model
    ("loading", "export"),                                          # lowbit.load; other engines' formats
    ("pipeline",),                                                  # quantize, save
    ("to_gguf", "streaming"),                                       # onto llama.cpp's types; one block at a time
    ("bench",),                                                     # side-by-side benchmarks
    ("cli",),                                                       # the commands
    ("__main__",),                                                  # python -m lowbit (torchrun -m lowbit)
)


def upward_imports(graph: dict[str, dict[str, list[str]]], layers=LAYERS) -> list[tuple[str, str]]:
    """The imports (unit, imported unit) whose target is not in a lower layer."""
    layer = {u: i for i, units in enumerate(layers) for u in units}
    return sorted((a, b) for a, targets in graph.items() for b in targets if a != b and layer[b] >= layer[a])


def test_every_unit_has_a_layer_and_imports_only_lower_layers():
    placed = {u for units in LAYERS for u in units}
    units = {_unit(u) for u in _units()}
    assert units <= placed, f"place these units in LAYERS: {sorted(units - placed)}"
    upward = upward_imports(import_graph())
    assert not upward, f"imports that run up or sideways between layers: {upward}"


def test_the_layer_check_catches_upward_and_sideways_imports():
    layers = (("a",), ("b", "c"), ("d",))
    assert upward_imports({"d": {"b": []}, "b": {"a": []}}, layers) == []
    assert upward_imports({"a": {"d": []}, "b": {"c": []}}, layers) == [("a", "d"), ("b", "c")]
