"""Imports only go down the layers (launcher > cluster > trainer > models > data > base), and no module of
transrec imports, directly or through others, a module that imports it back. Imports inside functions count."""
import ast
from pathlib import Path

import transrec

ROOT = Path(transrec.__file__).parent
LAYERS = {"launcher": 5, "cluster": 4, "trainer": 3, "models": 2, "writers": 1, "dataloading": 1}  # the rest: 0


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transrec"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found.update(name if name in modules else node.module for name in names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("transrec"))
    return {name for name in found if name in modules}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in paths.items()}


def test_imports_only_go_down_the_layers():
    upward = [(module, imported) for module, imported_set in import_graph().items() for imported in imported_set
              if layer(imported) > layer(module)]
    assert upward == []


def test_the_readers_never_import_the_writers():
    graph = import_graph()
    assert [(m, i) for m, imported in graph.items() if m.startswith("transrec.dataloading")
            for i in imported if i.startswith("transrec.writers")] == []


def test_no_import_cycle():
    graph = import_graph()
    # a package's __init__ that re-exports its modules lazily imports nothing at load: leave packages out
    graph = {m: {i for i in imported if graph.get(i) is not None and not (ROOT.parent / i.replace(".", "/")).is_dir()}
             for m, imported in graph.items()}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for imported in graph[module]:
                if imported == start:
                    cycles.append(path)
                elif imported not in seen:
                    seen.add(imported)
                    stack.append((imported, path + [imported]))
    assert cycles == []
