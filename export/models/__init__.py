"""Reference PyTorch models, with state-dict names of the published checkpoints."""

from .components import ConditioningEncoder, UNetBody
from .upscaler_unet import UpscalerUNet
from .vae_decoder import DECODER_CUTS, VAEDecoder, VAEDecoderHead, VAEDecoderTail

__all__ = [
    "DECODER_CUTS",
    "ConditioningEncoder",
    "UNetBody",
    "UpscalerUNet",
    "VAEDecoder",
    "VAEDecoderHead",
    "VAEDecoderTail",
]
