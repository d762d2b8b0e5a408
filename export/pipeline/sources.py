"""The project source a stage's artifacts depend on, found from the import graph.

A reused artifact is only right if no code that made it has changed, so a stage's reuse key hashes
every module of the project's packages that the stage's module imports, directly or through other
modules, lazily or not, with the packages' ``__init__`` files (Python runs them on import). The
graph is read from the sources with ``ast``, so nothing is imported and a new module is covered as
soon as something imports it. Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PROJECT_PACKAGES = frozenset({"export", "engines", "runtime", "calib"})
REPO_ROOT = Path(__file__).resolve().parents[2]


def module_file(name: str, root: Path | None = None) -> Path | None:
    """The source file of module ``name`` under ``root`` (the repository by default); None when
    there is none (a name imported from a module rather than a submodule)."""
    base = (root or REPO_ROOT).joinpath(*name.split("."))
    for candidate in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(names: set[str]) -> set[str]:
    return {".".join(name.split(".")[:end]) for name in names for end in range(1, name.count(".") + 2)}


def _imported_names(name: str, path: Path) -> frozenset[str]:
    """Every module name the source of ``name`` imports, wherever the import statement is, as
    absolute names (``from a import b`` yields ``a`` and ``a.b``: ``b`` may be a submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return _names_in_source(package, path.read_bytes(), str(path))


@functools.lru_cache(maxsize=1024)
def _names_in_source(package: str, source: bytes, filename: str) -> frozenset[str]:
    # Cached by content: a build computes several stages' keys over mostly the same files, and an
    # edited file is parsed again because its bytes differ.
    names = set()
    for node in _run_nodes(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return frozenset(names)


def _run_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(start: str, root: Path | None = None) -> dict[str, Path]:
    """``start`` and every project module it imports, transitively, with their source files."""
    found: dict[str, Path] = {}
    pending = list(_with_parents({start}))
    while pending:
        name = pending.pop()
        if name in found or name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        path = module_file(name, root)
        if path is None:
            continue
        found[name] = path
        pending.extend(_with_parents(_imported_names(name, path)))
    return found


def source_digest(start: str, root: Path | None = None) -> str:
    """Hash of the source of ``start`` and every project module it imports: the part of a stage's
    reuse key that a code change invalidates."""
    root = root or REPO_ROOT
    digest = hashlib.sha256()
    for path in sorted(imported_modules(start, root).values()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
