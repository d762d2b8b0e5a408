"""The backends the runtime can open, by name: each backend module registers how it opens and what
it needs (``BackendSpec``); ``Upscaler.load`` and ``auto``'s order (``runtime.selection``) read the
registry. An app or a test adds its own backend with ``register`` (or, for a scope, ``registered``)
instead of reaching into the runtime's private functions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.manifest import Manifest

from .base import Backend


@dataclass(frozen=True)
class OpenRequest:
    """What a backend opens: the folder, its manifest (already loaded and checked by the caller),
    the device, the torch backend's options, and ``only``: the components to open (None: all)."""

    folder: Path
    manifest: Manifest
    device: torch.device
    torch_options: dict
    only: tuple[str, ...] | None = None


@dataclass(frozen=True)
class BackendSpec:
    """``name`` as ``Upscaler.load(backend=...)`` takes it; ``needs``: one line saying what it needs
    (packages, device), for docs and messages; ``devices``: the device types it runs on (``auto``
    tries it only there); ``open(request) -> Backend`` raises ``BackendUnavailable`` when it cannot
    run here; ``choosable``: False for a path only ``auto`` and ``precision`` reach (the CPU graphs)."""

    name: str
    needs: str
    devices: tuple[str, ...]
    open: Callable[[OpenRequest], Backend]
    choosable: bool = True


_REGISTRY: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> BackendSpec | None:
    """Add ``spec`` (replacing one of the same name); returns the one it replaced."""
    replaced = _REGISTRY.get(spec.name)
    _REGISTRY[spec.name] = spec
    return replaced


@contextmanager
def registered(spec: BackendSpec) -> Iterator[BackendSpec]:
    """``spec`` registered for the block, what was there before restored after it."""
    replaced = register(spec)
    try:
        yield spec
    finally:
        if replaced is None:
            _REGISTRY.pop(spec.name, None)
        else:
            _REGISTRY[spec.name] = replaced


def spec(name: str) -> BackendSpec | None:
    return _REGISTRY.get(name)


def names() -> tuple[str, ...]:
    """The registered backends a caller may name, in registration order."""
    return tuple(name for name, entry in _REGISTRY.items() if entry.choosable)
