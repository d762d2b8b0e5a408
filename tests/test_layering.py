"""Dependencies flow one way (DESIGN.md, "Layering"), read from the sources: lazy imports count.

- ``engines`` imports nothing of ``export``, ``runtime``, ``calib``, ``benchmarks``.
- ``runtime`` reaches nothing of the build, directly or through what it imports: no
  ``export.build``, ``export.pipeline``, ``export.onnx``, ``export.reference``, ``calib``,
  polygraphy, onnxslim, onnx; only the torch backend (``runtime/backends.py``, and
  ``runtime/checkpoint.py`` that opens it on the published checkpoint) imports ``export``, and only
  the model definitions (``export.models``, ``export.checkpoint``).
- ``calib`` imports nothing of ``export``: packages import only the layers below them
  (engines, runtime, calib, export, benchmarks), the torch backend's model definitions aside.
- No cycle among the modules' import-time imports (a package's ``__init__`` runs before its modules).
And, by running it: ``Upscaler`` on the onnxruntime and torch backends loads none of the build.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engines", "export", "runtime", "calib", "benchmarks")
BUILD_SIDE = ("export.build", "export.pipeline", "export.onnx", "export.reference", "calib", "benchmarks")
BUILD_LIBRARIES = ("polygraphy", "onnxslim", "onnx", "onnxscript")
MODEL_DEFINITIONS = ("export.models", "export.checkpoint")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
    if "results" not in path.parts
}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, at import time?) for every import in ``module``'s source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # for type checkers only, never run
            if isinstance(child, ast.Import):
                found.extend((alias.name, eager) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.append((base, eager))
                found.extend((f"{base}.{alias.name}", eager) for alias in child.names if f"{base}.{alias.name}" in MODULES)
            visit(child, eager and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _project(name: str) -> str | None:
    """The project module an import loads (the longest known prefix), None for third-party."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _with_parents(module: str) -> list[str]:
    """``a.b.c`` loads ``a`` and ``a.b`` (their ``__init__``) first."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1) if ".".join(parts[:end]) in MODULES]


def _reached(start: str) -> set[str]:
    """Every import (project modules and third-party names) that loading ``start`` and calling all of
    its functions can run, transitively through project modules."""
    seen, names, todo = set(), set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name, _ in _imports(module):
            names.add(name)
            target = _project(name)
            if target:
                todo.extend(_with_parents(target))
    return names | seen


def test_the_source_parser_sees_lazy_imports_and_relative_ones():
    imports = dict(_imports("runtime.backends.pytorch"))
    assert imports["export.models.weights_record"] is False  # inside TorchBackend.__init__
    assert imports["runtime.upscale_pass"] is True and imports["engines.manifest"] is True  # "..", then absolute
    assert imports["runtime.backends.registry"] is True  # "."
    assert dict(_imports("runtime.backends.tensorrt"))["runtime.backends.tensorrt_rtx"] is False  # lazy, at the first engine


def test_engines_imports_nothing_above_it():
    offending = [(m, name) for m in MODULES if m.startswith("engines")
                 for name, _ in _imports(m) if _under(name, ("export", "runtime", "calib", "benchmarks"))]
    assert offending == []


def test_the_runtime_reaches_nothing_of_the_build():
    offending = {}
    for module in [m for m in MODULES if _under(m, ("runtime",))]:
        bad = sorted(n for n in _reached(module) if _under(n, BUILD_SIDE) or _under(n, BUILD_LIBRARIES))
        if bad:
            offending[module] = bad
    assert offending == {}


def test_only_the_torch_backend_imports_export_and_only_the_model_definitions():
    users = {}
    for module in [m for m in MODULES if _under(m, ("runtime",))]:
        names = sorted({n for n, _ in _imports(module) if _under(n, ("export",))})
        if names:
            users[module] = names
    assert set(users) == {"runtime.backends.pytorch", "runtime.checkpoint"}
    assert all(_under(n, MODEL_DEFINITIONS) for names in users.values() for n in names), users


def test_calib_imports_nothing_of_export():
    """calib is a library the build uses (quantization, the gate, calibration sets): it gets models
    and the reference as arguments, so the arrow runs export -> calib only."""
    offending = [(m, n) for m in MODULES if _under(m, ("calib",))
                 for n, _ in _imports(m) if _under(n, ("export", "benchmarks"))]
    assert offending == []


# Each package imports only those before it (lazy imports count). The one arrow against the order:
# runtime's torch backend rebuilds the models from their definitions (MODEL_DEFINITIONS, checked above).
LAYERS = ("engines", "runtime", "calib", "export", "benchmarks")


def test_packages_import_only_the_layers_below_them():
    def layer(name: str) -> int | None:
        return next((i for i, p in enumerate(LAYERS) if _under(name, (p,))), None)

    offending = sorted(
        (m, n) for m in MODULES for n, _ in _imports(m)
        if (target := layer(n)) is not None and target > layer(m)
        and not (_under(m, ("runtime",)) and _under(n, MODEL_DEFINITIONS))
    )
    assert offending == []


def test_no_import_time_cycles():
    graph = {
        module: {dep for name, eager in _imports(module) if eager
                 for target in [_project(name)] if target and target != module
                 # importing a.b.c runs a and a.b first; a module's own packages are already loading
                 for dep in _with_parents(target) if dep != module and not module.startswith(dep + ".")}
        for module in MODULES
    }
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def strongconnect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in graph:
        if module not in index:
            strongconnect(module)
    assert cycles == []


RUN_AND_LIST = """
import sys, torch
from runtime import Upscaler
with Upscaler.load({folder!r}, backend={backend!r}, device="cpu") as upscaler:
    upscaler.upscale(torch.randn(1, 32, 8, 8), scale=2)
print(" ".join(sorted(sys.modules)))
"""


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_an_upscaler_loads_none_of_the_build(small_artifacts, backend):
    code = RUN_AND_LIST.format(folder=str(small_artifacts), backend=backend)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = result.stdout.split()
    assert [m for m in loaded if _under(m, BUILD_SIDE) or _under(m, BUILD_LIBRARIES)] == []
    assert any(m == "runtime.upscaler" for m in loaded)
    if backend == "torch":
        assert {m for m in loaded if _under(m, ("export",))} <= {"export"} | {
            m for m in loaded if _under(m, MODEL_DEFINITIONS)}


LONG_MODULE_LINES = 350  # issue 32: a runtime module longer than this says at its top why it is one module


def test_a_long_runtime_module_says_why_it_is_one():
    unexplained = []
    for module in [m for m in MODULES if _under(m, ("runtime",))]:
        source = MODULES[module].read_text()
        doc = ast.get_docstring(ast.parse(source)) or ""
        if len(source.splitlines()) > LONG_MODULE_LINES and "Length: over 350 lines because" not in doc:
            unexplained.append(module)
    assert unexplained == []
