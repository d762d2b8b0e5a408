"""Artifact writing: a file appears complete under its name or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FlowUpscalerError


@contextmanager
def atomic_output(path: Path, shared: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    ``shared``: other processes may write ``path`` at the same time (the user cache folder), so the
    temporary name is this writer's own and the last complete file wins. Otherwise one fixed name
    (``<name>.partial``), which a folder's single writer cleans up after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    own = f".{os.getpid()}.{os.urandom(4).hex()}" if shared else ""
    partial = path.with_name(f"{path.name}{own}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class OutputPathError(FlowUpscalerError, ValueError):
    """An output path that cannot or must not be written; the message says which and why."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_file(path: Path, flag: str, protected: Path | None = None, source: Path | None = None) -> Path:
    """Refuse, before any work, an output file that cannot or must not be written; its resolved form.

    ``protected``: a folder never written into (an artifact folder); ``source``: the input file,
    never overwritten.
    """
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise OutputPathError(f"{flag} {path} cannot be resolved ({exc})") from None
    if protected is not None and _inside(resolved, protected.resolve()):
        raise OutputPathError(
            f"{flag} {path} is inside the artifact folder {protected}: writing there would overwrite the "
            "artifact folder's files; choose a path outside it"
        )
    if resolved.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file path, e.g. {path / 'out'}")
    parent = resolved.parent
    if not parent.exists():
        raise OutputPathError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {path}: {path.parent} is not a folder")
    if source is not None and (
        resolved == source.resolve() or (resolved.exists() and source.exists() and os.path.samefile(resolved, source))
    ):
        raise OutputPathError(f"{flag} {path} is the input file; choose another path (the input is never overwritten)")
    try:  # the only reliable writability test (permissions, read-only mounts, root): make a file there
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise OutputPathError(
            f"{flag} {path}: cannot write in the folder {path.parent} ({exc.strerror or exc}); choose another folder"
        ) from None
    return resolved
