"""The import graph of the code: no module imports itself back through others, and the edge runtime
imports only what a device has.

Every ``import`` statement that can run counts, wherever it is (module level or inside a function): a
cycle hidden in a function is still a cycle a reader has to untangle. Imports under ``if TYPE_CHECKING:``
never run (annotations only) and are left out. An edge goes to the module an import names: ``from
a import b`` is an edge to ``a.b`` when that is a module, else to ``a``; a package's own ``__init__``
running before its submodules is Python's doing, not an edge.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "serve", "exporters", "edge")
EDGE_ALLOWED = {"numpy", "onnxruntime", "tokenizers", "edge"}
"""What ``edge/*`` may import besides the standard library (see README: a device has no torch)."""


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runnable_imports(node: ast.AST):
    """Every Import/ImportFrom under ``node`` except those in an ``if TYPE_CHECKING:`` body."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        if _is_type_checking(child):
            for sub in child.orelse:
                yield from _runnable_imports(ast.Module(body=[sub], type_ignores=[]))
            continue
        yield from _runnable_imports(child)


def imported_names(path: Path, module: str, modules: set[str] | None = None) -> set[str]:
    """Every dotted name ``path`` imports: ``import a.b`` gives ``a.b``; ``from a import b`` gives ``a.b``
    when that is one of ``modules`` (a submodule), else ``a``; relative imports are resolved against ``module``."""
    modules = modules or set()
    is_package = path.name == "__init__.py"
    names = set()
    for node in _runnable_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            anchor = parts[: len(parts) - node.level + (1 if is_package else 0)]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(path, module, set(files)):
            parts = name.split(".")
            # ``import a.b.c`` of a name that is not a module (an attribute): its longest module prefix
            found = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in files), None)
            if found:
                targets.add(found)
        graph[module] = {t for t in targets if t != module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_cycles_through_function_level_imports(tmp_path: Path) -> None:
    """The checker itself can fail: a two-module cycle where one side imports inside a function; an import
    under ``if TYPE_CHECKING:`` makes none."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nimport b\nif TYPE_CHECKING:\n    import c2\n")
    (tmp_path / "c2.py").write_text("import c\n")

    def graph(names: tuple[str, ...]) -> dict[str, set[str]]:
        return {m: {n for n in imported_names(tmp_path / f"{m}.py", m) if n in names and n != m} for m in names}

    assert find_cycles(graph(("a", "b"))) == [["a", "b"]]
    assert find_cycles(graph(("c", "c2"))) == []
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert {"pipeline.export", "pipeline.bundle", "pipeline.evaluate", "serve.adapters"} <= set(graph)
    assert find_cycles(graph) == []


def test_edge_imports_only_what_a_device_has() -> None:
    stdlib = set(sys.stdlib_module_names)
    for module, path in module_files().items():
        if module.split(".")[0] != "edge":
            continue
        foreign = sorted(n for n in imported_names(path, module)
                         if n and n.split(".")[0] not in stdlib | EDGE_ALLOWED)
        assert foreign == [], f"{module} imports {foreign}: edge/ must run without torch, transformers or pipeline"


def test_the_adapter_spec_is_torch_free() -> None:
    path = ROOT / "pipeline" / "adapter_spec.py"
    imported = {n.split(".")[0] for n in imported_names(path, "pipeline.adapter_spec") if n}
    assert imported <= set(sys.stdlib_module_names) | {"pipeline"}
    assert {n for n in imported_names(path, "pipeline.adapter_spec") if n.startswith("pipeline.")} \
        <= {"pipeline.errors", "pipeline.errors.EdgetuneError"}
