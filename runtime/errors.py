"""The runtime's error kinds, all ``FlowUpscalerError``s, each refining the built-in an app's code may
already catch. ``InvalidLatentsError`` is the latent contract's (``runtime.latents``), ``ManifestError``
the manifest's (``engines.manifest``)."""

from __future__ import annotations

from engines.errors import FlowUpscalerError

from .latents import InvalidLatentsError


class BackendUnavailable(FlowUpscalerError, RuntimeError):
    """The backend cannot run here (missing package, no GPU, no built engine); says which."""


class SizeOutOfRangeError(InvalidLatentsError):
    """Latents the artifact folder's profiles do not cover, or too large to decode in the memory
    the device has free."""


class InvalidArgumentError(FlowUpscalerError, ValueError):
    """An argument other than the latents (seed, device, backend) outside what is accepted; says what is."""


class UpscalerClosedError(FlowUpscalerError, RuntimeError):
    """An ``Upscaler`` used after ``close()`` (or after its ``with`` block)."""


class NonFiniteOutputError(FlowUpscalerError, ArithmeticError):
    """A backend computed NaN or Inf from latents within the accepted range: never returned as a result."""
