"""The fp32 eager reference: one-step 2x upscale and its 4x/8x chains (MODEL.md section 2).

Every later check (ONNX, engines, runtime backends) compares against these functions.

The latent contract (validation, noise convention) is in ``runtime.latents``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from engines.cli import SEED_RANGE, int_in_range, run_cli
from runtime.latents import (
    LATENT_CHANNELS,
    SCALES,
    InvalidLatentsError,
    describe_shape,
    pack,
    read_latents,
    unpack,
    validate_latents,
    write_latents,
)
from runtime.noise import CpuNoise
from runtime.upscale_pass import timesteps, x0_from_velocity
from runtime.numerics import full_fp32

from .checkpoint import add_weight_arguments, load_unet
from .models.upscaler_unet import UpscalerUNet


def validate_pass_inputs(sample: torch.Tensor, latents_small: torch.Tensor) -> None:
    """One pass: ``sample`` on the multiple-of-4 grid, ``latents_small`` exactly half its size."""
    validate_latents(sample, "sample", grid=4)
    validate_latents(latents_small, "latents_small", grid=2)
    b, _, h, w = sample.shape
    expected = (b, LATENT_CHANNELS, h // 2, w // 2)
    if tuple(latents_small.shape) != expected:
        raise InvalidLatentsError(
            f"latents_small must be {expected} for a sample of {describe_shape(sample)}, "
            f"got {describe_shape(latents_small)}"
        )


@torch.no_grad()
def velocity(model: UpscalerUNet, sample: torch.Tensor, latents_small: torch.Tensor) -> torch.Tensor:
    """The model's velocity at t = 1000, in IEEE fp32 (TF32 off), after input validation."""
    validate_pass_inputs(sample, latents_small)
    if model.training:
        raise RuntimeError("the model is in training mode (dropout active); call model.eval() first")
    timestep = timesteps(sample.shape[0], sample.device)
    with full_fp32():
        return model(sample=sample.float(), timestep=timestep, latents_small=latents_small.float()).float()


def upscale_step(model: UpscalerUNet, latents_small: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One flow-match Euler step from sigma 1 to 0: ``x0 = noise - v``, in fp32."""
    return x0_from_velocity(noise, velocity(model, noise, latents_small))


def upscale(
    model: UpscalerUNet,
    latents: torch.Tensor,
    scale: int = 2,
    seed: int = 0,
) -> torch.Tensor:
    """2x, 4x or 8x: the one-step pass chained, each output the next pass's low-res input."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale}")
    validate_latents(latents)
    noise = CpuNoise(seed)
    x = latents.float()
    for _ in range(int(math.log2(scale))):
        x = upscale_step(model, x, noise.next_pass(x))
    return x


def pass_reference(model: UpscalerUNet) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """One fp32 eager 2x pass of ``model`` as the accuracy gate takes it (``calib.accuracy.Reference``):
    ``(latents_small, seed) -> x0``."""
    model = model.eval()
    return lambda latents_small, seed: upscale(model, latents_small, scale=2, seed=seed)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW in latent pixels, e.g. 32x48, got {text!r}")
    return height, width


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.reference",
        description=(
            "Upscale a FLUX.2 latent 2x/4x/8x with the fp32 eager Flow Upscaler (the reference "
            "every engine is checked against). Input: a .safetensors file holding one tensor, or "
            "one named 'latents', normalised, [B, 32, h, w] (or packed [B, 128, h/2, w/2])."
        ),
    )
    add_weight_arguments(parser)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input", type=Path, help="input latent .safetensors file")
    inputs.add_argument(
        "--random-input", type=_parse_size, metavar="HxW", help="a seeded N(0,1) latent of this size"
    )
    parser.add_argument("--scale", type=int, choices=SCALES, default=2)
    parser.add_argument("--seed", type=int_in_range(*SEED_RANGE), default=0, help=f"noise seed, 0..{SEED_RANGE[1]} (default 0)")
    parser.add_argument(
        "--weights-seed", type=int_in_range(*SEED_RANGE), default=0, help=f"seed of --random-weights, 0..{SEED_RANGE[1]} (default 0)"
    )
    parser.add_argument(
        "--latent-format",
        choices=("flux2", "flux2_packed"),
        default="flux2",
        help="flux2: [B, 32, h, w]; flux2_packed: ComfyUI's [B, 128, h/2, w/2] (output in the same form)",
    )
    parser.add_argument("--output", type=Path, required=True, help="output .safetensors file")
    return parser


def reference_command(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.input is not None:
        latents = read_latents(args.input)
    else:
        generator = torch.Generator("cpu").manual_seed(args.seed + 1)
        latents = torch.randn((1, LATENT_CHANNELS, *args.random_input), generator=generator)
    if args.latent_format == "flux2_packed":
        latents = unpack(latents)
    validate_latents(latents)
    model = load_unet(args.checkpoint, random_weights=args.random_weights, seed=args.weights_seed)
    out = upscale(model, latents, scale=args.scale, seed=args.seed)
    if args.latent_format == "flux2_packed":
        out = pack(out)
    write_latents(args.output, out)
    print(f"wrote {args.output}: {tuple(latents.shape)} -> {tuple(out.shape)} ({args.scale}x)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals are one ``error:`` line and exit 1."""
    return run_cli(reference_command, argv)


if __name__ == "__main__":
    sys.exit(main())
