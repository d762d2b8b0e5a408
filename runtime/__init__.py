"""The embeddable runtime: ``Upscaler.load(artifact_dir)`` once, then ``upscale(latents, scale)``.

Every error it raises on purpose is a ``FlowUpscalerError`` (kinds: ``InvalidLatentsError`` and
``SizeOutOfRangeError``, ``InvalidArgumentError``, ``BackendUnavailable``, ``ManifestError``,
``UpscalerClosedError``, ``NonFiniteOutputError``), with a message that says what to do.

The names below load on first use, so that a module of this package (``runtime.latents``, the
latent contract the export side shares) imports without loading the backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engines.lazy import lazy_exports

_EXPORTS = {
    "BackendUnavailable": "runtime.errors",
    "FlowUpscalerError": "engines.errors",
    "ManifestError": "engines.manifest",
    "NonFiniteOutputError": "runtime.errors",
    "InvalidArgumentError": "runtime.errors",
    "InvalidLatentsError": "runtime.latents",
    "SizeOutOfRangeError": "runtime.errors",
    "Upscaler": "runtime.upscaler",
    "UpscalerClosedError": "runtime.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what the names are, for type checkers and readers
    from engines.errors import FlowUpscalerError  # noqa: F401
    from engines.manifest import ManifestError  # noqa: F401

    from .errors import (BackendUnavailable, InvalidArgumentError, NonFiniteOutputError, SizeOutOfRangeError,  # noqa: F401
                         UpscalerClosedError)
    from .latents import InvalidLatentsError  # noqa: F401
    from .upscaler import Upscaler  # noqa: F401


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
