"""FLUX.2 latent format (MODEL.md section 3): 2x2 patchify, BN normalisation, packed form.

The Flow Upscaler works on normalised 32-channel latents at 1/8 of pixel size. The VAE's
normalisation lives in patchified space (128 channels at 1/16), which is also the packed form
ComfyUI passes around, so ``pack``/``unpack`` are patchify/unpatchify with their channel counts
checked.

This module is the latent contract shared by the eager reference (``export``) and the runtime, so
it lives on the runtime side, which must not import ``export``. The noise convention is in
``runtime.noise``, the pass in ``runtime.upscale_pass``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.errors import FlowUpscalerError
from engines.files import atomic_output

LATENT_CHANNELS = 32
PACKED_CHANNELS = 4 * LATENT_CHANNELS
SCALES = (2, 4, 8)
PIXELS_PER_PATCH = 16  # image pixels per packed latent pixel (the VAE's 8, then 2x2 patches)
# Latents of other model families, by channel count, for the messages that refuse them.
OTHER_LATENTS = {4: "SD 1.x/2.x/SDXL", 16: "FLUX.1, SD3 or Wan", 64: "Hunyuan", 12: "Cosmos"}
# The largest |value| a normalised latent may hold. Normalised FLUX.2 latents have unit variance per
# channel (the VAE's BN statistics), so what a VAE makes of any image stays within tens; 1000 is far
# beyond that and still far inside what every compute dtype holds (fp16 up to 65504), where values
# near the dtype's limit overflow in the networks' normalisations and come back NaN or finite
# nonsense, on every backend.
LATENT_LIMIT = 1000.0


class InvalidLatentsError(FlowUpscalerError, ValueError):
    """A latent tensor has the wrong rank, channels, size, dtype or non-finite values."""


def _require_rank4(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise InvalidLatentsError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InvalidLatentsError(
            f"{name} must have rank 4 [batch, channels, height, width], got shape {tuple(x.shape)}"
        )


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]; channel ``4c + 2i + j`` holds pixel (2y+i, 2x+j)."""
    _require_rank4(latents, "latents")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise InvalidLatentsError(f"patchify needs even height and width, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unpatchify(patches: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``patchify``: [B, 4C, h, w] -> [B, C, 2h, 2w]."""
    _require_rank4(patches, "patches")
    b, c4, h, w = patches.shape
    if c4 % 4:
        raise InvalidLatentsError(f"unpatchify needs a channel count divisible by 4, got {c4}")
    x = patches.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """32-channel latent [B, 32, H, W] -> ComfyUI's packed FLUX.2 form [B, 128, H/2, W/2]."""
    _require_rank4(latents, "latents")
    if latents.shape[1] != LATENT_CHANNELS:
        raise InvalidLatentsError(
            f"pack expects {LATENT_CHANNELS} channels, got {latents.shape[1]}"
        )
    return patchify(latents)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Packed FLUX.2 latent [B, 128, h, w] -> the 32-channel form [B, 32, 2h, 2w]."""
    _require_rank4(packed, "packed latents")
    if packed.shape[1] != PACKED_CHANNELS:
        raise InvalidLatentsError(
            f"unpack expects {PACKED_CHANNELS} channels, got {packed.shape[1]}"
        )
    return unpatchify(packed)


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of the VAE's patchified latents (its affine-free BatchNorm)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_running_stats(
        cls, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
    ) -> "LatentStats":
        mean = running_mean.detach().float().reshape(1, -1, 1, 1)
        std = torch.sqrt(running_var.detach().float() + eps).reshape(1, -1, 1, 1)
        return cls(mean=mean, std=std)

    @classmethod
    def from_vae(cls, vae: torch.nn.Module) -> "LatentStats":
        """Read the stats of a diffusers ``AutoencoderKLFlux2`` (eps from its config)."""
        return cls.from_running_stats(
            vae.bn.running_mean, vae.bn.running_var, vae.config.batch_norm_eps
        )

    @staticmethod
    def record_of_vae(vae: torch.nn.Module) -> dict:
        """The VAE's BatchNorm buffers as the manifest keeps them (``weights.vae.latent_stats``):
        float32 values written as JSON numbers, which read back bit-exact."""
        return {"running_mean": vae.bn.running_mean.detach().float().tolist(),
                "running_var": vae.bn.running_var.detach().float().tolist(),
                "eps": float(vae.config.batch_norm_eps)}

    @classmethod
    def from_record(cls, record: dict) -> "LatentStats":
        """The stats from ``record_of_vae``'s record, computed as diffusers' pipelines do (fp32)."""
        return cls.from_running_stats(torch.tensor(record["running_mean"], dtype=torch.float32),
                                      torch.tensor(record["running_var"], dtype=torch.float32), record["eps"])


def normalise(latents: torch.Tensor, stats: LatentStats) -> torch.Tensor:
    """Raw VAE latent (32 ch) -> the normalised latent the Flow Upscaler takes."""
    patches = patchify(latents)
    return unpatchify((patches - stats.mean.to(patches)) / stats.std.to(patches))


def denormalise(latents: torch.Tensor, stats: LatentStats) -> torch.Tensor:
    """Normalised latent (32 ch) -> raw VAE latent, ready for ``post_quant_conv``."""
    patches = patchify(latents)
    return unpatchify(patches * stats.std.to(patches) + stats.mean.to(patches))


def tokens_to_packed(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``Flux2Pipeline``'s ``output_type="latent"`` tokens [B, h*w, 128] -> packed [B, 128, h, w].

    ``height``/``width``: the image size in pixels the pipeline was called with (h = height // 16,
    w = width // 16, as it rounds); its tokens are in row-major order (its latent ids). The values
    are already BN-normalised: the result is the runtime's ``flux2_packed`` and what the
    pipelines' ``latents=`` argument takes. Exact (a reshape)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[2] != PACKED_CHANNELS:
        got = f"shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise InvalidLatentsError(f"tokens must be a tensor [batch, h*w, {PACKED_CHANNELS}] (Flux2Pipeline's "
                                  f"latent output), got {got}")
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int) or side < 2 * PIXELS_PER_PATCH:
            raise InvalidLatentsError(f"{name} must be the image's {name} in pixels the pipeline was called with "
                                      f"(an int >= {2 * PIXELS_PER_PATCH}), got {side!r}")
    h, w = height // PIXELS_PER_PATCH, width // PIXELS_PER_PATCH
    if tokens.shape[1] != h * w:
        raise InvalidLatentsError(
            f"tokens hold {tokens.shape[1]} positions, but a {height}x{width} px image has {h}x{w} = {h * w}: "
            "give the height and width the pipeline was called with")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], PACKED_CHANNELS, h, w)


def packed_to_tokens(packed: torch.Tensor) -> torch.Tensor:
    """Packed [B, 128, h, w] -> ``Flux2Pipeline``'s token form [B, h*w, 128] (inverse of ``tokens_to_packed``)."""
    _require_rank4(packed, "packed latents")
    if packed.shape[1] != PACKED_CHANNELS:
        raise InvalidLatentsError(f"packed latents must have {PACKED_CHANNELS} channels, got {packed.shape[1]}")
    return packed.flatten(2).transpose(1, 2)


def describe_shape(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}"


def value_range(x: torch.Tensor) -> tuple[float, float]:
    """(smallest, largest) value: one reduction and one device sync, no tensor of ``x``'s size (NaN
    in any value makes both NaN, so this also tells whether ``x`` is finite)."""
    low, high = torch.stack(torch.aminmax(x)).tolist()
    return low, high


def validate_latents(latents: torch.Tensor, name: str = "latents", grid: int = 2,
                     limit: float | None = LATENT_LIMIT) -> None:
    """Refuse anything but a finite float [B, 32, h, w] tensor with h, w multiples of ``grid`` and
    values within +-``limit`` (``LATENT_LIMIT``; None: finite is enough, for raw VAE latents)."""
    if not isinstance(latents, torch.Tensor):
        raise InvalidLatentsError(f"{name} must be a torch.Tensor, got {type(latents).__name__}")
    if latents.dim() != 4:
        raise InvalidLatentsError(
            f"{name} must have rank 4 [batch, {LATENT_CHANNELS}, height, width], got {describe_shape(latents)}"
        )
    batch, channels, height, width = latents.shape
    if channels != LATENT_CHANNELS:
        raise InvalidLatentsError(
            f"{name} must have {LATENT_CHANNELS} channels (unpacked FLUX.2 latent), got {channels}"
        )
    if batch < 1 or height < grid or width < grid or height % grid or width % grid:
        raise InvalidLatentsError(
            f"{name} height and width must be positive multiples of {grid}, got {height}x{width}"
        )
    if not latents.is_floating_point():
        raise InvalidLatentsError(f"{name} must be a floating-point tensor, got {latents.dtype}")
    low, high = value_range(latents)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidLatentsError(f"{name} contains NaN or Inf values")
    if limit is not None and max(-low, high) > limit:
        raise InvalidLatentsError(
            f"{name} hold values up to {max(-low, high):.4g} in magnitude; normalised FLUX.2 latents have unit "
            f"variance and are accepted within +-{limit:g} (runtime.latents.LATENT_LIMIT). Pass latents the "
            "VAE made, normalised (latent_format='flux2'), or raw VAE latents as latent_format='flux2_vae'"
        )


def read_latents(path: str | Path) -> torch.Tensor:
    """The latent tensor of a ``.safetensors`` file: its only tensor, or the one named ``latents``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise InvalidLatentsError(f"{path} is a folder; give a .safetensors file")
    if not path.exists():
        raise InvalidLatentsError(f"{path} does not exist")
    if not path.is_file():
        raise InvalidLatentsError(f"{path} is not a regular file; give a .safetensors file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InvalidLatentsError(f"{path} is not a readable .safetensors file ({exc})") from exc
    if "latents" in tensors:
        return tensors["latents"]
    if len(tensors) != 1:
        raise InvalidLatentsError(
            f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])}); "
            "expected one tensor, or one named 'latents'"
        )
    return next(iter(tensors.values()))


def write_latents(path: str | Path, latents: torch.Tensor) -> None:
    """``latents`` as the tensor ``latents`` of a ``.safetensors`` file, written atomically."""
    from safetensors.torch import save_file

    with atomic_output(Path(path)) as partial:
        save_file({"latents": latents.detach().cpu().contiguous()}, str(partial))
