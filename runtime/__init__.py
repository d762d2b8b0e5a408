"""The embeddable runtime: ``Upscaler.load(artifact_dir)`` once, then ``upscale(latents, scale)``."""

from .backends import BackendUnavailable
from .latents import InvalidLatentsError
from .upscaler import InvalidArgumentError, SizeOutOfRangeError, Upscaler, UpscalerClosedError

__all__ = [
    "BackendUnavailable",
    "InvalidArgumentError",
    "InvalidLatentsError",
    "SizeOutOfRangeError",
    "Upscaler",
    "UpscalerClosedError",
]
