"""The two TensorRTs this toolkit builds engines with and runs them on: what differs, in one place.

- TensorRT 10/11 (module ``tensorrt``): builds on the GPU it targets (tactics are timed there),
  for datacenter and RTX GPUs alike.
- TensorRT for RTX (module ``tensorrt_rtx``): builds ahead of time for a named compute capability
  on any machine, GPU or not, and compiles its kernels just in time on the user's GPU at first
  load. It targets GeForce/RTX PRO classes only (no 9.0: H100/H200 need TensorRT 10/11).

Engines of either run only under the exact version that built them; the manifest records the
flavour and that version, and the runtime refuses a folder of another flavour or version.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import FlowUpscalerError


class FlavourError(FlowUpscalerError, ValueError):
    """An engine flavour that does not exist, or cannot serve the asked target."""


@dataclass(frozen=True)
class Flavour:
    name: str  # as written in manifests and given to --engine-flavour
    module: str  # the Python module
    title: str  # for messages
    extra: str  # the pyproject extra that installs it
    # Compute capabilities it builds for without that GPU; empty: only the local GPU's own.
    ahead_of_time: tuple[tuple[int, int], ...] = ()

    def version(self) -> str | None:
        """The installed version, or None when the module (or its native libraries) will not import."""
        try:
            module = importlib.import_module(self.module)
        except (ImportError, OSError):
            return None
        return getattr(module, "__version__", None)

    def import_module(self):
        return importlib.import_module(self.module)

    @property
    def install_hint(self) -> str:
        return f"pip install -e '.[{self.extra}]'"

    def targets(self, compute_capability: tuple[int, int]) -> bool:
        """Whether engines for ``compute_capability`` can be built ahead of time (without that GPU)."""
        return compute_capability in self.ahead_of_time


TENSORRT = Flavour("tensorrt", "tensorrt", "TensorRT", "trt")
# TensorRT-RTX 1.7's ComputeCapability enum: SM75, SM80, SM86, SM89, SM120, SM121.
TENSORRT_RTX = Flavour("tensorrt-rtx", "tensorrt_rtx", "TensorRT-RTX", "rtx",
                       ahead_of_time=((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)))
FLAVOURS = {f.name: f for f in (TENSORRT, TENSORRT_RTX)}


def get_flavour(name: str) -> Flavour:
    try:
        return FLAVOURS[name]
    except KeyError:
        raise FlavourError(f"unknown engine flavour {name!r}; known: {', '.join(FLAVOURS)}") from None
