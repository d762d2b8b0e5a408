"""The models split into the parts that become graphs and engines (DESIGN.md).

The U-Net's two parts wrap one shared ``UpscalerUNet``: no parameters are copied, so
``UNetBody(m)(sample, *ConditioningEncoder(m)(latents_small, t))`` is ``m(sample, t, latents_small)``.
``PARTS`` names each part's module and its inputs and outputs: what the exporter traces and what
the runtime's torch backend runs, by the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .upscaler_unet import UpscalerUNet
from .vae_decoder import VAEDecoder, VAEDecoderTail

DEFAULT_CUT = "f3"

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


@dataclass
class Models:
    """The fp32 eager models the parts are cut from (None where not loaded)."""

    unet: nn.Module | None = None
    vae: nn.Module | None = None
    cut: str = DEFAULT_CUT


@dataclass(frozen=True)
class Part:
    """One part: the model it ``needs``, its named inputs and outputs, and how to ``build`` it.

    ``fp32_inputs``/``fp32_outputs`` name the tensors that are fp32 at the part's boundary in
    every precision (cast to/from the compute dtype inside); ``exact_inputs`` are fp32 and used
    uncast (the timestep). All other inputs and outputs are in the compute dtype.
    """

    name: str
    needs: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    build: Callable[[Models], nn.Module]
    fp32_inputs: frozenset[str] = frozenset()
    fp32_outputs: frozenset[str] = frozenset()
    exact_inputs: frozenset[str] = frozenset()

    def module(self, models: Models) -> nn.Module:
        if getattr(models, self.needs) is None:
            raise ValueError(f"component {self.name!r} needs the {self.needs} model, which is not loaded")
        return self.build(models).eval()


PARTS: dict[str, Part] = {
    p.name: p
    for p in (
        Part("cond_encoder", "unet", COND_ENCODER_INPUTS, COND_ENCODER_OUTPUTS, lambda m: ConditioningEncoder(m.unet),
             fp32_inputs=frozenset({"latents_small"}), exact_inputs=frozenset({"timestep"})),
        Part("unet", "unet", UNET_INPUTS, UNET_OUTPUTS, lambda m: UNetBody(m.unet),
             fp32_inputs=frozenset({"sample"}), fp32_outputs=frozenset(UNET_OUTPUTS)),
        Part("vae_decoder", "vae", ("latents",), ("image",), lambda m: VAEDecoder(m.vae),
             fp32_inputs=frozenset({"latents"}), fp32_outputs=frozenset({"image"})),
        Part("vae_decoder_tail", "vae", ("features",), ("image",), lambda m: VAEDecoderTail(VAEDecoder(m.vae), m.cut),
             fp32_outputs=frozenset({"image"})),
    )
}
