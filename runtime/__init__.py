"""The embeddable runtime: ``Upscaler.load(artifact_dir)`` once, then ``upscale(latents, scale)``.

The names below load on first use, so that a module of this package (``runtime.latents``, the
latent contract the export side shares) imports without loading the backends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "BackendUnavailable": "runtime.backends",
    "InvalidArgumentError": "runtime.upscaler",
    "InvalidLatentsError": "runtime.latents",
    "SizeOutOfRangeError": "runtime.upscaler",
    "Upscaler": "runtime.upscaler",
    "UpscalerClosedError": "runtime.upscaler",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .backends import BackendUnavailable
    from .latents import InvalidLatentsError
    from .upscaler import InvalidArgumentError, SizeOutOfRangeError, Upscaler, UpscalerClosedError


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
