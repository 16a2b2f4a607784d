"""fedward's top-level packages form no cycle of imports, counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("fedward", "data_adapters", "models", "privacy", "explain", "actors", "pipelines")


def package_of(module: str) -> str | None:
    """Which of fedward's packages a module name belongs to (`fedward.pipelines.run`: pipelines)."""
    parts = module.split(".")
    if parts[0] != "fedward":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "fedward"


def imported_packages(path: Path) -> set[str]:
    """fedward's packages that a module imports anywhere in its body, functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            # `from fedward import width` imports a module of the shared package; `from fedward.pipelines import run`, pipelines.
            names = [f"{node.module}.{a.name}" if node.module == "fedward" else node.module or "" for a in node.names]
        else:
            names = []
        found.update(p for p in map(package_of, names) if p)
    return found


def package_graph() -> dict[str, set[str]]:
    return {p: set().union(*(imported_packages(f) for f in (ROOT / p).rglob("*.py"))) - {p} for p in PACKAGES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle through the graph, each listed once from its smallest member."""
    found = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append([*path, start])
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_the_packages_import_each_other_without_a_cycle():
    graph = package_graph()
    assert graph["fedward"] == set(), f"the shared package imports {graph['fedward']}"
    assert not cycles(graph), "\n".join(" -> ".join(c) for c in cycles(graph))


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    module = tmp_path / "m.py"
    module.write_text("from fedward import width\ndef f():\n    from fedward.pipelines.run import Pipeline\n    import fedward.models.flat\n")
    assert imported_packages(module) == {"fedward", "pipelines", "models"}
