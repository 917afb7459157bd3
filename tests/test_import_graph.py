"""The house as docs/ARCHITECTURE.md draws it, checked on the source's import statements (ast).

Every import counts, at module level or inside a function: a function-level import is still an
edge (it only defers the cycle to run time). Two rules:

- no import cycle among the ``pipeline/`` modules (shared pieces live in ``pipeline/dataset.py``,
  ``pipeline/head_training.py``, ``pipeline/signals.py``, not in another command's module);
- ``models/`` never imports ``pipeline/`` (weight and SAE folders load through ``models/folders.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_mammo_sae"


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folder ``root``."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` names (a.b.c.func -> a.b.c)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (relative and absolute, at any depth)."""
    known = modules(root)
    top = root.name
    graph: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        is_pkg = path.name == "__init__.py"
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                groups = [[a.name] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - (node.level - 1)]
                    mod = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # "from . import store" names a submodule; "from .x import f" names module x
                groups = [[f"{mod}.{a.name}", mod] for a in node.names]
            else:
                continue
            for candidates in groups:
                for imported in candidates:
                    target = _target(imported, known) if imported.startswith(top) else None
                    if target is not None:
                        if target != name:
                            graph[name].add(target)
                        break
    return graph


def cycles(graph: dict[str, set[str]], within: str) -> list[list[str]]:
    """Strongly connected components of more than one module among those under ``within``."""
    nodes = [n for n in graph if n.startswith(within + ".")]
    sub = {n: {m for m in graph[n] if m in nodes} for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(sub[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return found


def forbidden_edges(graph: dict[str, set[str]], source: str, target: str) -> list[tuple[str, str]]:
    """(a, b) for every import of a module under ``target`` by a module under ``source``."""
    return sorted(
        (a, b)
        for a, deps in graph.items()
        if a == source or a.startswith(source + ".")
        for b in deps
        if b == target or b.startswith(target + ".")
    )


def test_pipeline_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "napari_mammo_sae.pipeline.extract" in graph  # the walk found the package
    assert cycles(graph, "napari_mammo_sae.pipeline") == []


def test_models_never_import_pipeline():
    graph = import_graph(PACKAGE)
    assert forbidden_edges(graph, "napari_mammo_sae.models", "napari_mammo_sae.pipeline") == []


def test_the_checker_sees_function_level_cycles_and_forbidden_edges(tmp_path):
    pkg = tmp_path / "napari_mammo_sae"
    (pkg / "pipeline").mkdir(parents=True)
    (pkg / "models").mkdir()
    for init in (pkg, pkg / "pipeline", pkg / "models"):
        (init / "__init__.py").write_text("")
    (pkg / "pipeline" / "a.py").write_text("from .b import f\n")
    (pkg / "pipeline" / "b.py").write_text("def f():\n    from . import e, c\n")
    (pkg / "pipeline" / "c.py").write_text("def g():\n    from .a import x\n")
    (pkg / "pipeline" / "d.py").write_text("from .a import f\n")  # outside the cycle
    (pkg / "pipeline" / "e.py").write_text("import json\n")
    (pkg / "models" / "m.py").write_text("def h():\n    from ..pipeline.d import y\n")
    (pkg / "models" / "n.py").write_text("import napari_mammo_sae.pipeline.a\n")
    graph = import_graph(pkg)
    prefix = "napari_mammo_sae.pipeline."
    assert cycles(graph, "napari_mammo_sae.pipeline") == [
        [prefix + "a", prefix + "b", prefix + "c"]
    ]
    assert forbidden_edges(graph, "napari_mammo_sae.models", "napari_mammo_sae.pipeline") == [
        ("napari_mammo_sae.models.m", prefix + "d"),
        ("napari_mammo_sae.models.n", prefix + "a"),
    ]
