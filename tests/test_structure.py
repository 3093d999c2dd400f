"""The package's import graph: no cycles, layers and models import nothing above them, benchmarks stay outside."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = "flover_backend"
ROOT = Path(__file__).resolve().parents[1]
# Not importable in a test process: the first runs the CLI, the second needs the module only Triton's stub has.
NOT_IMPORTABLE = {"flover_backend.__main__", "flover_backend.triton_model.adapter"}


def module_names() -> list[str]:
    """Every module of the package, by dotted name."""
    names = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_modules(module: str, known: set[str]) -> set[str]:
    """The modules `module` imports, anywhere in its file (function-level imports too), as dotted names.

    `from a import b` counts as importing `a.b` when that is a module, else `a`.
    """
    path = ROOT / Path(*module.split("."))
    is_package = path.is_dir()
    tree = ast.parse((path / "__init__.py" if is_package else path.with_suffix(".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports."""
    known = set(module_names())
    return {module: {name for name in imported_modules(module, known) if name in known and name != module}
            for module in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when it has none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_the_package_imports():
    graph = import_graph()
    assert "flover_backend.model_runner" in graph["flover_backend.engine"]
    assert "flover_backend.models.loader" in graph["flover_backend.model_runner"]
    assert "flover_backend.layers.linear" in graph["flover_backend.models.llama"]


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_nothing_below_imports_above():
    """engine -> scheduler / runner -> model -> layers -> native: layers import no model, models nothing above
    them, and the C kernels' wrappers nothing of the package but each other."""
    for module, imports in import_graph().items():
        if module.startswith("flover_backend.native"):
            assert all(name.startswith("flover_backend.native") for name in imports), (module, imports)
        if module.startswith("flover_backend.layers"):
            assert all(name.startswith(("flover_backend.layers", "flover_backend.native")) for name in imports), (
                module, imports)
        if module.startswith("flover_backend.models"):
            assert all(name.startswith(("flover_backend.models", "flover_backend.layers", "flover_backend.native"))
                       for name in imports), (module, imports)
        if not module.startswith("flover_backend.triton_model"):
            assert not any(name.startswith("flover_backend.triton_model") for name in imports), (module, imports)


def test_the_package_imports_neither_benchmarks_nor_clients():
    known = set(module_names())
    for module in known:
        outside = {name for name in imported_modules(module, known) if name.split(".")[0] in ("benchmarks", "clients")}
        assert not outside, (module, outside)


@pytest.mark.parametrize("module", [name for name in module_names() if name not in NOT_IMPORTABLE])
def test_every_module_imports(module):
    importlib.import_module(module)
