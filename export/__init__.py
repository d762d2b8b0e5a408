"""PyTorch side of the toolkit: models, checkpoint loading, ONNX export, the build, the eager reference.

Every error the build raises on purpose is a ``FlowUpscalerError`` (kinds: ``BuildError``,
``CheckpointError``, and those of ``engines`` and ``calib``). The names below load on first use,
so that ``export.models`` (what the runtime's torch backend imports) loads nothing of the build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engines.lazy import lazy_exports

_EXPORTS = {
    "BuildError": "export.pipeline.errors",
    "CheckpointError": "export.checkpoint",
    "FlowUpscalerError": "engines.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what the names are, for type checkers and readers
    from engines.errors import FlowUpscalerError  # noqa: F401

    from .checkpoint import CheckpointError  # noqa: F401
    from .pipeline.errors import BuildError  # noqa: F401


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
