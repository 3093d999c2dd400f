"""The package's import graph: no cycles, each layer imports only the layers under it, benchmarks stay outside."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "flover_backend"
ROOT = Path(__file__).resolve().parents[1]
# Not importable in a test process: the first runs the CLI, the second needs the module only Triton's stub has.
NOT_IMPORTABLE = {"flover_backend.__main__", "flover_backend.frontends.triton.adapter"}


def module_names() -> list[str]:
    """Every module of the package, by dotted name."""
    names = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_modules(module: str, known: set[str]) -> set[str]:
    """The modules `module` imports, anywhere in its file (function-level imports too), as dotted names.

    `from a import b` counts as importing `a.b` when that is a module, else `a`; imports under `if TYPE_CHECKING:`
    do not count.
    """
    path = ROOT / Path(*module.split("."))
    is_package = path.is_dir()
    tree = ast.parse((path / "__init__.py" if is_package else path.with_suffix(".py")).read_text())
    found = set()
    for node in _runtime_nodes(tree):
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


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:`: a type-only import is no dependency at run time."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (child for branch in node.orelse for child in [branch, *_runtime_nodes(branch)])
            continue
        yield node
        yield from _runtime_nodes(node)


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
    assert "flover_backend.execution.model_runner" in graph["flover_backend.engine.engine"]
    assert "flover_backend.execution.models.loader" in graph["flover_backend.execution.model_runner"]
    assert "flover_backend.execution.layers.linear" in graph["flover_backend.execution.models.llama"]


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


# The layers, bottom to top: what each package of flover_backend may import besides itself. The base modules
# (admission, config, errors, the parameter table and its flags, paths, ports, request, triton_env) sit under
# every layer and import no layer.
BASE = ("admission", "config", "errors", "param_flags", "param_table", "paths", "ports", "request", "triton_env")
LAYERS = {
    "native": (),  # the C kernels: nothing of the package
    "sampling": ("native",),
    "execution.layers": ("native",),
    "execution.models": ("execution.layers", "native"),
    "execution": ("sampling", "native"),
    "engine": ("execution", "sampling", "native"),
    "server": (),  # the launcher, its watchdog and processes: light, no torch, no engine
    "frontends.openai": ("sampling.params", "sampling.structured_output"),  # light: no torch, no model loader
    "frontends.triton": ("engine", "sampling"),
}


def layer_of(module: str) -> str | None:
    """The most specific layer `module` belongs to, by dotted prefix (without the package name)."""
    name = module.removeprefix(f"{PACKAGE}.")
    owners = [layer for layer in LAYERS if name == layer or name.startswith(f"{layer}.")]
    return max(owners, key=len) if owners else None


def allowed(layer: str, target: str) -> bool:
    """Whether a module of `layer` may import `target` (a dotted module name)."""
    name = target.removeprefix(f"{PACKAGE}.")
    if name.split(".")[0] in BASE and name.count(".") == 0:
        return True
    return any(name == ok or name.startswith(f"{ok}.") for ok in (layer, *LAYERS[layer]))


def test_base_modules_import_no_layer():
    for module, imports in import_graph().items():
        if module.removeprefix(f"{PACKAGE}.") in BASE:
            assert all(name.removeprefix(f"{PACKAGE}.") in BASE + ("sampling.params",) for name in imports), (
                module, imports)


def test_nothing_below_imports_above():
    """Each layer imports only itself, the layers under it and the base modules; nothing imports a front."""
    graph = import_graph()
    for module, imports in graph.items():
        layer = layer_of(module)
        if layer is not None:
            assert all(allowed(layer, name) for name in imports), (module, sorted(
                name for name in imports if not allowed(layer, name)))
    for layer in LAYERS:  # every layer has modules: a renamed package must not slip out of the rules
        assert any(layer_of(module) == layer for module in graph), layer


def test_the_package_imports_neither_benchmarks_nor_clients():
    known = set(module_names())
    for module in known:
        outside = {name for name in imported_modules(module, known) if name.split(".")[0] in ("benchmarks", "clients")}
        assert not outside, (module, outside)


@pytest.mark.parametrize("module", [name for name in module_names() if name not in NOT_IMPORTABLE])
def test_every_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("module", ["flover_backend.frontends.openai.app", "flover_backend.frontends.openai.__main__",
                                    "flover_backend.server.serve", "flover_backend.frontends.triton.parsing"])
def test_light_processes_import_no_torch(module):
    """The OpenAI front and the launcher are light processes: importing them (in a fresh interpreter) loads
    neither torch nor the model loader."""
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('flover_backend.execution')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
