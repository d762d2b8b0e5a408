"""The embeddable runtime: ``Upscaler.load(artifact_dir)`` once, then ``upscale(latents, scale)``."""

from .backends import BackendUnavailable
from .latents import InvalidLatentsError
from .upscaler import SizeOutOfRangeError, Upscaler

__all__ = ["BackendUnavailable", "InvalidLatentsError", "SizeOutOfRangeError", "Upscaler"]
