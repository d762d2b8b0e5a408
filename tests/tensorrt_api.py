"""TensorRT names: the ones our sources use, and the ones the real bindings binaries define.

TensorRT's libraries cannot be installed on CPU machines, so our TensorRT code never runs in CI.
Instead ``tests/test_tensorrt_api.py`` checks every TensorRT name our code uses against the names
compiled into the real bindings (``tensorrt_bindings/tensorrt.so`` of the ``tensorrt-cuXX-bindings``
wheels). Nothing here imitates TensorRT: the names are read from the binaries' bytes.

TensorRT-RTX installs on CPU machines, so its check is exact: each name is looked up on the class
its receiver holds (``RECEIVER_CLASSES``) or on the module along its chain (``trt.CudaGraphStrategy.X``
on that enum), and each call's arguments are matched against the signatures pybind11 writes into the
real methods' docstrings (``check_on_module``). The binaries' string tables carry no classes, so the
TensorRT 10/11 check can only ask whether a name exists at all.

Name lists, one per TensorRT version, are committed under ``tests/data/tensorrt_api/``; to make one:

    python -m tests.tensorrt_api --write WHEEL [WHEEL...]

Convention for the TensorRT modules (any project module that imports tensorrt). Python cannot tell
a TensorRT object from another without running the code, so the collector goes by names:
- import TensorRT only as ``import tensorrt`` or ``import tensorrt as trt``;
- hold TensorRT objects in variables or attributes whose name, without leading underscores, is one
  of ``RECEIVERS`` (``engine``, ``self._runtime``, ``state.context``), and give nothing else those
  names: every attribute read or written on them is checked against the binaries;
- pass attribute names to ``getattr``/``hasattr`` on TensorRT objects as string literals or
  module-level string constants. A name probed with ``hasattr`` or ``getattr(..., default)`` is
  optional in that module (the code copes with its absence): it must exist in at least one
  TensorRT version, every other name in every version.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import re
import shlex
import sys
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LISTS = Path(__file__).resolve().parent / "data" / "tensorrt_api"
LIBRARY = "tensorrt_bindings/tensorrt.so"

MODULE_ALIASES = frozenset({"trt", "tensorrt"})
# Names reserved for TensorRT objects in the TensorRT modules (see the convention above), and the
# class of the TensorRT module each one holds.
RECEIVER_CLASSES = {
    "engine": "ICudaEngine", "context": "IExecutionContext", "runtime": "Runtime", "builder": "Builder",
    "network": "INetworkDefinition", "parser": "OnnxParser", "config": "IBuilderConfig", "timing_cache": "ITimingCache",
    "optimization_profile": "IOptimizationProfile", "runtime_config": "IRuntimeConfig", "runtime_cache": "IRuntimeCache",
}
RECEIVERS = frozenset(RECEIVER_CLASSES)
# Module attributes set by the package's Python __init__.py, not by the .so (the wheel test checks
# that the wheel's __init__.py really assigns them). A chain stops at them: what follows is Python's.
PYTHON_NAMES = frozenset({"__version__"})

# Whole NUL-terminated identifier strings. Docstrings never match (spaces); C++ mangled symbols
# (``_Z...``, 3/4 of all identifiers, from the symbol tables) are dropped: pybind names never
# start with ``_Z``, and they would swell the lists from ~47 KB to ~1.4 MB.
_IDENTIFIER = re.compile(rb"(?<![^\x00])[A-Za-z_][A-Za-z0-9_]*(?=\x00)")
_DUNDER = re.compile(r"^__\w+__$")  # Python's protocol names (__init__): overriding them is Python's business


def names_in_library(data: bytes) -> set[str]:
    """Identifier strings of a compiled bindings library, as ``strings`` would show them."""
    return {m.decode() for m in _IDENTIFIER.findall(data) if not m.startswith(b"_Z")}


def names_in_wheel(path: Path) -> set[str]:
    """The identifier strings of the bindings library inside a ``tensorrt-cuXX-bindings`` wheel."""
    with zipfile.ZipFile(path) as wheel:
        return names_in_library(wheel.read(LIBRARY))


def python_names_in_wheel(path: Path) -> set[str]:
    """Names the wheel's ``tensorrt_bindings/__init__.py`` assigns at module level."""
    with zipfile.ZipFile(path) as wheel:
        tree = ast.parse(wheel.read("tensorrt_bindings/__init__.py"))
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def is_present(name: str, names: set[str]) -> bool:
    """True if ``name`` is in the binary: linkers store a string that ends another only once."""
    return name in names or any(s.endswith(name) for s in names)


@dataclass(frozen=True)
class Arguments:
    """What a call passes: how many positional arguments, which keywords, and whether ``*``/``**`` unpacking
    hides the rest."""

    positional: int
    keywords: tuple[str, ...]
    unpacked: bool

    def __str__(self) -> str:
        return ", ".join(["_"] * self.positional + [f"{k}=_" for k in self.keywords] + (["*..."] if self.unpacked else []))


@dataclass(frozen=True)
class Access:
    """One TensorRT chain in our sources: ``context.set_input_shape(name, shape)`` is root ``context``,
    names ``("set_input_shape",)``, called with two positional arguments."""

    where: str
    root: str  # a module alias or a receiver name, leading underscores stripped
    names: tuple[str, ...]
    call: Arguments | None = None  # the arguments, when the last name is called
    optional: bool = False  # probed with hasattr/getattr(..., default): may be absent

    def text(self) -> str:
        return ".".join((self.root, *self.names)) + (f"({self.call})" if self.call is not None else "")


@dataclass
class Usage:
    """TensorRT names our sources use, each with where (``file:line``)."""

    required: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    optional: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    problems: list[str] = field(default_factory=list)  # convention breaks the collector cannot see past
    accesses: list[Access] = field(default_factory=list)  # every chain with its root, for the exact check

    def all(self) -> set[str]:
        return set(self.required) | set(self.optional)


def _strip(name: str) -> str:
    """``_runtime`` is a ``runtime``; ``__init__`` stays itself."""
    return name if _DUNDER.match(name) else name.lstrip("_")


def _chain(node: ast.expr) -> list[str]:
    """An attribute chain's names, root first: ``state.engine.get_tensor_dtype`` -> 3 names.

    A root that is not a name (a call, a subscript) is left out: ``f().context.x`` -> context, x.
    """
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
    return names[::-1]


def _tensorrt_part(chain: list[str]) -> tuple[str | None, list[str]]:
    """The chain's first TensorRT root (module alias or receiver) and the names TensorRT resolves after it."""
    for i, name in enumerate(chain):
        root = _strip(name)
        if root in MODULE_ALIASES or root in RECEIVERS:
            resolved = []
            for attr in chain[i + 1 :]:
                if attr in PYTHON_NAMES:
                    break
                resolved.append(attr)
            return root, resolved
    return None, []


class _Collector(ast.NodeVisitor):
    def __init__(self, where: str, tree: ast.Module):
        self.where = where
        self.uses: list[tuple[str, int, bool]] = []  # (name, line, optional)
        self.accesses: list[Access] = []
        self.problems: list[str] = []
        self._calls: dict[int, Arguments] = {}  # id of a called chain's node -> the call's arguments
        self.constants = {
            t.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for t in node.targets
            if isinstance(t, ast.Name)
        }

    def _use(self, name: str, node: ast.AST, optional: bool = False) -> None:
        if name not in PYTHON_NAMES:
            self.uses.append((name, node.lineno, optional))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "tensorrt" and (alias.asname or "tensorrt") not in MODULE_ALIASES:
                self.problems.append(f"{self.where}:{node.lineno}: import tensorrt as {alias.asname} (use trt)")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").split(".")[0] == "tensorrt":
            self.problems.append(f"{self.where}:{node.lineno}: from {node.module} import ... (use import tensorrt as trt)")

    def _access(self, root: str, names: list[str], node: ast.AST, call: Arguments | None = None,
                optional: bool = False) -> None:
        if names:
            self.accesses.append(Access(f"{self.where}:{node.lineno}", root, tuple(names), call, optional))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = _chain(node)
        tensorrt_root, names = _tensorrt_part(chain)
        for name in names:
            self._use(name, node)
        if tensorrt_root is not None:
            after_root = len(chain) - next(i for i, n in enumerate(chain) if _strip(n) == tensorrt_root) - 1
            called = self._calls.get(id(node)) if len(names) == after_root else None  # not a Python name's call
            self._access(tensorrt_root, names, node, called)
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        self.visit(root)  # chains inside a root call or subscript

    def visit_Call(self, node: ast.Call) -> None:
        probe = node.func.id if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") else None
        if probe and len(node.args) >= 2:
            root, names = _tensorrt_part(_chain(node.args[0]))
            if root is not None:
                name, optional = node.args[1], probe == "hasattr" or len(node.args) == 3
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    name = name.value
                elif isinstance(name, ast.Name) and name.id in self.constants:
                    name = self.constants[name.id]
                else:
                    self.problems.append(f"{self.where}:{node.lineno}: {probe} on a TensorRT object with a computed name")
                    name = None
                if name is not None:
                    self._use(name, node, optional)
                    self._access(root, [*names, name], node, optional=optional)
        self._calls[id(node.func)] = Arguments(
            positional=sum(not isinstance(a, ast.Starred) for a in node.args),
            keywords=tuple(k.arg for k in node.keywords if k.arg is not None),
            unpacked=any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords),
        )
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        """TensorRT calls back the methods a subclass of its interface classes defines (phase_start...)."""
        for base in node.bases:
            root, names = _tensorrt_part(_chain(base))
            if root not in MODULE_ALIASES:
                continue
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _DUNDER.match(item.name):
                    self._use(item.name, item)
                    self._access(root, [*names, item.name], item)  # a callback the base class declares
        self.generic_visit(node)


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def used_names(paths: list[Path]) -> Usage:
    """The TensorRT names the given sources use, and where.

    Names probed with hasattr/getattr-with-default in a module are optional throughout that module.
    """
    usage = Usage()
    for path in paths:
        where = _relative(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        collector = _Collector(where, tree)
        collector.visit(tree)
        probed = {name for name, _, optional in collector.uses if optional}
        for name, line, _ in collector.uses:
            places = (usage.optional if name in probed else usage.required)[name]
            if f"{where}:{line}" not in places:
                places.append(f"{where}:{line}")
        usage.problems += collector.problems
        usage.accesses += collector.accesses
    return usage


def imports_tensorrt(tree: ast.AST, module: str = "tensorrt") -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == module for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == module:
            return True
    return False


def _project_imports(path: Path, tree: ast.AST) -> set[Path]:
    """Project modules ``path`` imports from (relative or absolute, lazily inside functions included)."""
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        base = path.parent
        for _ in range(max(node.level - 1, 0)):
            base = base.parent
        target = (base if node.level else ROOT) / Path(*node.module.split("."))
        if target.with_suffix(".py").is_file():
            found.add(target.with_suffix(".py").resolve())
    return found


def tensorrt_rtx_modules() -> list[Path]:
    """The modules whose TensorRT names must exist in TensorRT-RTX: those importing ``tensorrt_rtx``,
    and the TensorRT modules they import from or that import from them (code both flavours share:
    the TensorRT backend, the build's progress monitor)."""
    trees = {path.resolve(): ast.parse(path.read_text()) for path in project_sources()}
    rtx = {path for path, tree in trees.items() if imports_tensorrt(tree, "tensorrt_rtx")}
    shared = {path for path, tree in trees.items() if imports_tensorrt(tree)}
    linked = {p for p in shared if _project_imports(p, trees[p]) & rtx}
    linked |= {p for r in rtx for p in _project_imports(r, trees[r]) if p in shared}
    return sorted(rtx | linked)


@dataclass(frozen=True)
class Parameter:
    name: str
    required: bool
    kind: str  # "positional" (or keyword), "keyword" (only), "*" or "**"


# One signature line of a pybind11 docstring: ``name(self: T, a: int, b: str = 'x') -> bool``, numbered
# ``1. name(...)`` for each overload (the first line then reads ``name(*args, **kwargs)``).
_SIGNATURE = re.compile(r"^(?:\d+\. )?(\w+)\((.*)\) -> ", re.MULTILINE)


def _split_top_level(text: str) -> list[str]:
    """``a: Dict[str, int], b: int = <E.X: 0>`` -> its two parameters (commas inside brackets stay)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{<":
            depth += 1
        elif char in ")]}>":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return parts + [tail] if tail else parts


def _parameters(text: str) -> list[Parameter]:
    parameters, keyword_only = [], False
    for part in _split_top_level(text):
        if part == "*":
            keyword_only = True
        elif part.startswith("**"):
            parameters.append(Parameter(part[2:].split(":")[0], False, "**"))
        elif part.startswith("*"):
            parameters.append(Parameter(part[1:].split(":")[0], False, "*"))
            keyword_only = True
        elif part != "/":
            name = part.split(":")[0].split("=")[0].strip()
            parameters.append(Parameter(name, "=" not in part, "keyword" if keyword_only else "positional"))
    return parameters


def signatures(function: object, name: str, bound: bool = True) -> list[list[Parameter]]:
    """The signatures of a pybind11 function or method, from its docstring (``self`` left out when
    ``bound``: called on an instance); a Python-defined function's from ``inspect``; empty where
    the docstring shows none."""
    if inspect.isfunction(function):
        kinds = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**",
                 inspect.Parameter.KEYWORD_ONLY: "keyword"}
        found = [[Parameter(p.name, p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD),
                            kinds.get(p.kind, "positional")) for p in inspect.signature(function).parameters.values()]]
    else:
        found = [_parameters(m.group(2)) for m in _SIGNATURE.finditer(getattr(function, "__doc__", None) or "")
                 if m.group(1) == name and m.group(2) != "*args, **kwargs"]
    return [ps[1:] if bound and ps and ps[0].name == "self" else ps for ps in found]


def accepts(parameters: list[Parameter], call: Arguments) -> bool:
    """Whether a call with these arguments binds to these parameters."""
    if call.unpacked:
        return True
    positional = [p for p in parameters if p.kind == "positional"]
    if call.positional > len(positional) and not any(p.kind == "*" for p in parameters):
        return False
    bound = {p.name for p in positional[:call.positional]}
    named = {p.name for p in parameters if p.kind in ("positional", "keyword")}
    for keyword in call.keywords:
        if keyword in bound or (keyword not in named and not any(p.kind == "**" for p in parameters)):
            return False
    given = bound | set(call.keywords)
    return all(p.name in given for p in parameters if p.required and p.kind in ("positional", "keyword"))


def _describe_signatures(name: str, found: list[list[Parameter]]) -> str:
    def one(parameters: list[Parameter]) -> str:
        return ", ".join(("*" if p.kind == "*" else "**" if p.kind == "**" else "") + p.name + ("" if p.required else "=...")
                         for p in parameters)

    return " or ".join(dict.fromkeys(f"{name}({one(ps)})" for ps in found))  # overloads differ in types only


def check_on_module(accesses: list[Access], module: object) -> list[str]:
    """What the real module says is wrong with each access, one line each: a name its class (or the
    module, or the enum or class named before it) lacks, exactly, or a call that fits none of the
    callable's signatures. A chain is followed while it names classes; past a method or property
    the type is not known, so the check stops there."""
    problems = []
    for access in accesses:
        if access.root in MODULE_ALIASES:
            owner, label = module, access.root
        else:
            owner = getattr(module, RECEIVER_CLASSES[access.root])
            label = f"{access.root} ({owner.__name__})"
        value = None  # what the whole chain names, when it could be followed to its end
        for i, name in enumerate(access.names):
            if not hasattr(owner, name):
                if not access.optional:
                    where = ".".join((label, *access.names[:i]))
                    problems.append(f"{access.where}: {access.text()}: {where} has no {name!r}")
                break
            found = getattr(owner, name)
            if i == len(access.names) - 1:
                value = found
            elif not isinstance(found, type):
                break  # past a method, property or enum value the type is not known
            owner = found
        if access.call is None or value is None:
            continue
        name, constructor = access.names[-1], isinstance(value, type)
        # On a receiver the method is bound; ``trt.ILogger.__init__(self)`` passes self itself.
        bound = constructor or access.root in RECEIVERS
        found = signatures(value.__init__ if constructor else value, "__init__" if constructor else name, bound)
        if found and not any(accepts(ps, access.call) for ps in found):
            problems.append(f"{access.where}: {access.text()}: the real one takes {_describe_signatures(name, found)}")
    return problems


def project_sources() -> list[Path]:
    """Every module of the project's packages (tests excluded), so new modules are found too."""
    packages = sorted(p.parent for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")
    return [path for package in packages for path in sorted(package.rglob("*.py"))]


def tensorrt_modules() -> list[Path]:
    """The project modules that import TensorRT: the ones the name check covers."""
    return [path for path in project_sources() if imports_tensorrt(ast.parse(path.read_text()))]


POLYGRAPHY_TRT = "polygraphy.backend.trt"


@dataclass(frozen=True)
class PolygraphyCall:
    """A call of a ``polygraphy.backend.trt`` callable: ``CreateConfig``, or a method ``Profile.add``."""

    where: str
    target: str
    keywords: tuple[str, ...]


def _scope_nodes(scope: ast.AST):
    """The nodes of one function (or module) body, without those of functions nested in it."""
    for child in ast.iter_child_nodes(scope):
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            yield from _scope_nodes(child)


def polygraphy_calls(paths: list[Path]) -> list[PolygraphyCall]:
    """Calls of Polygraphy's TensorRT loaders, of their methods, and of loader instances.

    Methods are followed on a direct call (``Profile().add``) or on a name assigned a loader in
    the same function (``converted = Profile()`` then ``converted.add(...)``, ``create_config(...)``).
    """
    calls = []
    for path in paths:
        where, tree = _relative(path), ast.parse(path.read_text(), filename=str(path))
        imported = {
            alias.asname or alias.name: alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == POLYGRAPHY_TRT
            for alias in node.names
        }
        modules = {POLYGRAPHY_TRT} | {
            alias.asname
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
            if alias.name == POLYGRAPHY_TRT and alias.asname
        }

        def loader(func: ast.expr) -> str | None:
            chain = _chain(func)
            if isinstance(func, ast.Name):
                return imported.get(func.id)
            if isinstance(func, ast.Attribute) and ".".join(chain[:-1]) in modules:
                return chain[-1]
            return None

        for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
            nodes = list(_scope_nodes(scope))
            bound = {
                node.targets[0].id: loader(node.value.func)
                for node in nodes
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Call) and loader(node.value.func)
            }
            for node in nodes:
                if not isinstance(node, ast.Call):
                    continue
                func, target = node.func, loader(node.func)
                if target is None and isinstance(func, ast.Name) and func.id in bound:
                    target = f"{bound[func.id]}.__call__"
                elif target is None and isinstance(func, ast.Attribute):
                    owner = loader(func.value.func) if isinstance(func.value, ast.Call) else None
                    owner = owner or (bound.get(func.value.id) if isinstance(func.value, ast.Name) else None)
                    target = f"{owner}.{func.attr}" if owner else None
                if target:
                    keywords = tuple(k.arg for k in node.keywords if k.arg is not None)
                    calls.append(PolygraphyCall(f"{where}:{node.lineno}", target, keywords))
    return calls


def missing(uses: dict[str, list[str]], names: set[str]) -> dict[str, list[str]]:
    return {name: places for name, places in sorted(uses.items()) if not is_present(name, names)}


def describe(absent: dict[str, list[str]]) -> str:
    return "\n".join(f"  {name}  (used at {', '.join(places)})" for name, places in absent.items())


@dataclass(frozen=True)
class NameList:
    """A committed name list: the names and the wheel they were read from."""

    path: Path
    wheel: str
    sha256: str
    names: frozenset[str]

    @property
    def version(self) -> str:
        return self.wheel.split("-")[1]


def load_list(path: Path) -> NameList:
    header, names = {}, set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            header[key.strip()] = value.strip()
        elif line:
            names.add(line)
    return NameList(path, header["wheel"], header["sha256"], frozenset(names))


def committed_lists() -> list[NameList]:
    return [load_list(path) for path in sorted(LISTS.glob("*.txt"))]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_list(wheel: Path, command: str) -> Path:
    dist, version = wheel.name.split("-")[:2]
    out = LISTS / f"{dist}-{version}.txt"
    header = [
        f"# wheel: {wheel.name}",
        f"# sha256: {sha256(wheel)}",
        f"# command: {command}",
        f"# names: whole NUL-terminated strings of {LIBRARY} matching [A-Za-z_][A-Za-z0-9_]*, less C++ mangled symbols (_Z...)",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + sorted(names_in_wheel(wheel))) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.tensorrt_api", description=__doc__.splitlines()[0])
    parser.add_argument("--write", nargs="+", type=Path, required=True, metavar="WHEEL", help="tensorrt-cuXX-bindings wheels")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "tests.tensorrt_api", *(sys.argv[1:] if argv is None else argv)])
    for wheel in args.write:
        out = write_list(wheel, command)
        print(f"{out.relative_to(ROOT)}: {len(load_list(out).names)} names, {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
