"""The package's import graph has no circle (#32.1): every import of builder/, function-level
ones included, runs downward. Imports under `if TYPE_CHECKING:` are for type checkers only and
never run, so they do not count (the pipeline names the Workspace type it is handed; the
workspace, above it, creates the tables the stages declare: builder/catalog.py)."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "builder"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(module: str, path: Path, node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1] if node.level else []
    target = ".".join(base + (node.module.split(".") if node.module else []))
    return [f"{target}.{a.name}" for a in node.names] + [target]


def import_graph(root: Path = ROOT) -> nx.DiGraph:
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                node.body = []  # walked later: emptied first
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in imported(module, path, node):
                    while name and name not in modules:
                        name = name.rpartition(".")[0]
                    if name and name not in (module, "builder"):
                        graph.add_edge(module, name)
    return graph


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert graph.number_of_edges() > 100  # the walk found the imports (a broken walk would pass vacuously)
    assert ("builder.workspace", "builder.catalog") in graph.edges  # the edge that used to close the circle, now downward
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert circles == []


def test_the_walk_sees_a_circle_when_there_is_one(tmp_path):
    """The check itself, on a package with a circle through a function-level import."""
    package = tmp_path / "builder"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import x\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    graph = import_graph(package)
    assert [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1] == [["builder.a", "builder.b"]]
    assert not graph.has_edge("builder.c", "builder.a")
