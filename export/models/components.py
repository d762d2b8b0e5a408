"""The U-Net split into the two graphs that are exported and built separately (DESIGN.md).

Both wrap one shared ``UpscalerUNet``: no parameters are copied, so
``UNetBody(m)(sample, *ConditioningEncoder(m)(latents_small, t))`` is ``m(sample, t, latents_small)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .upscaler_unet import UpscalerUNet

COND_ENCODER_INPUTS = ("latents_small", "timestep")
COND_ENCODER_OUTPUTS = ("cond", "lr1", "lr2", "lr3")
UNET_INPUTS = ("sample",) + COND_ENCODER_OUTPUTS
UNET_OUTPUTS = ("velocity",)


class ConditioningEncoder(nn.Module):
    """``(latents_small, timestep) -> (cond, lr1, lr2, lr3)``; the lr maps stay at low-res size."""

    def __init__(self, unet: UpscalerUNet):
        super().__init__()
        self.unet = unet

    def forward(
        self, latents_small: torch.Tensor, timestep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.unet.encode_conditioning(latents_small, timestep)


class UNetBody(nn.Module):
    """``(sample, cond, lr1, lr2, lr3) -> velocity``; resizes the lr maps to the sample's grid."""

    def __init__(self, unet: UpscalerUNet):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        cond: torch.Tensor,
        lr1: torch.Tensor,
        lr2: torch.Tensor,
        lr3: torch.Tensor,
    ) -> torch.Tensor:
        return self.unet.denoise(sample, cond, lr1, lr2, lr3)
