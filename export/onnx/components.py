"""What each exported graph is: its module, its named inputs/outputs and their dynamic axes.

These names are the contract between ONNX, engines and runtime: ``cond_encoder``'s outputs
carry the names of ``unet``'s matching inputs, so the runtime can pass them on by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from ..models import ConditioningEncoder, VAEDecoder, VAEDecoderHead
from ..models.components import DEFAULT_CUT, PARTS, Models, Part
from runtime.upscale_pass import timesteps

__all__ = ["COMPONENTS", "DEFAULT_CUT", "Component", "Models"]


@dataclass(frozen=True)
class Component(Part):
    """One exported graph: a model part (``export.models.components.PARTS``) and how to trace it.

    ``export_size`` and ``check_sizes`` are (batch, height, width) of the main input for
    tracing and for validation;
    the second check size is non-square and not the traced one.
    ``input_shapes(models, batch, height, width)`` gives every input's shape for a size of the
    main input, which must be a multiple of ``grid``; engine profiles are derived from it.
    """

    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    make_inputs: Callable[[Models, int, int, int, torch.Generator], tuple[torch.Tensor, ...]] | None = field(
        default=None, repr=False
    )
    export_size: tuple[int, int, int] = (1, 8, 12)
    check_sizes: tuple[tuple[int, int, int], ...] = ((1, 8, 12), (2, 10, 14), (1, 12, 6))
    output_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    input_shapes: Callable[[Models, int, int, int], dict[str, tuple[int, ...]]] | None = field(
        default=None, repr=False
    )
    grid: int = 2


def _part(name: str) -> dict:
    """The fields of the model part ``name``, to extend into a Component."""
    part = PARTS[name]
    return {f.name: getattr(part, f.name) for f in fields(Part)}


def _spatial(prefix: str = "") -> dict[int, str]:
    return {0: "batch", 2: f"{prefix}height", 3: f"{prefix}width"}


def _half(size: int) -> int:
    return -(-size // 2)


def _cond_encoder_shapes(models: Models, batch: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    return {"latents_small": (batch, models.unet.config["sample_channels"], h, w), "timestep": (batch,)}


def _unet_shapes(models: Models, batch: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    config = models.unet.config
    width = config["base_channels"]
    lr_h, lr_w = h // 2, w // 2
    return {
        "sample": (batch, config["sample_channels"], h, w),
        "cond": (batch, config["cond_dim"]),
        "lr1": (batch, width, lr_h, lr_w),
        "lr2": (batch, width, _half(lr_h), _half(lr_w)),
        "lr3": (batch, width, _half(_half(lr_h)), _half(_half(lr_w))),
    }


def _decoder_shapes(models: Models, batch: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    return {"latents": (batch, models.vae.config.latent_channels, h, w)}


def _cond_encoder_inputs(models: Models, batch: int, h: int, w: int, gen: torch.Generator):
    latents_small = torch.randn(batch, 32, h, w, generator=gen)
    return latents_small, timesteps(batch)


@torch.no_grad()
def _unet_inputs(models: Models, batch: int, h: int, w: int, gen: torch.Generator):
    # Real encoder outputs, not random maps: the body is checked on the distributions it gets.
    latents_small = torch.randn(batch, 32, h // 2, w // 2, generator=gen)
    encoded = ConditioningEncoder(models.unet)(latents_small, timesteps(batch))
    return (torch.randn(batch, 32, h, w, generator=gen), *encoded)


def _decoder_inputs(models: Models, batch: int, h: int, w: int, gen: torch.Generator):
    return (torch.randn(batch, 32, h, w, generator=gen),)


@torch.no_grad()
def _tail_inputs(models: Models, batch: int, h: int, w: int, gen: torch.Generator):
    head = VAEDecoderHead(VAEDecoder(models.vae), models.cut)
    return (head(torch.randn(batch, 32, h, w, generator=gen)),)


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component(
            **_part("cond_encoder"),
            dynamic_axes={"latents_small": _spatial(), "timestep": {0: "batch"}},
            output_axes={"cond": {0: "batch"}, "lr1": _spatial()},
            make_inputs=_cond_encoder_inputs,
            input_shapes=_cond_encoder_shapes,
        ),
        Component(
            **_part("unet"),
            dynamic_axes={
                "sample": _spatial(),
                "cond": {0: "batch"},
                "lr1": _spatial("lr1_"),
                "lr2": _spatial("lr2_"),
                "lr3": _spatial("lr3_"),
            },
            output_axes={"velocity": _spatial()},
            export_size=(1, 16, 24),
            check_sizes=((1, 16, 24), (2, 20, 28), (1, 24, 12)),
            make_inputs=_unet_inputs,
            input_shapes=_unet_shapes,
            grid=4,
        ),
        Component(
            **_part("vae_decoder"),
            dynamic_axes={"latents": _spatial()},
            make_inputs=_decoder_inputs,
            input_shapes=_decoder_shapes,
        ),
        Component(
            **_part("vae_decoder_tail"),
            dynamic_axes={"features": _spatial()},
            make_inputs=_tail_inputs,
        ),
    )
}
