"""``python -m runtime.upscale``: upscale a latent file with an artifact folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from engines.cli import run_cli
from engines.files import atomic_output
from engines.manifest import ManifestError

from .backends import BackendUnavailable
from .latents import InvalidLatentsError, read_latents, write_latents
from .upscaler import BACKENDS, LATENT_FORMATS, Upscaler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.upscale",
        description="Upscale normalised FLUX.2 latents 2x, 4x or 8x with an artifact folder built by "
        "`python -m export.build`; optionally decode the result to PNG.",
    )
    parser.add_argument("artifacts", type=Path, help="artifact folder (with manifest.json)")
    parser.add_argument("--input", type=Path, required=True, help=".safetensors with one tensor, or one named 'latents'")
    parser.add_argument("--output", type=Path, required=True, help="output .safetensors (tensor 'latents')")
    parser.add_argument("--scale", type=int, default=2, choices=(2, 4, 8))
    parser.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same result on every backend)")
    parser.add_argument("--decode", type=Path, help="also decode to this PNG (batch > 1: NAME_0.png, NAME_1.png, ...)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda if present)")
    parser.add_argument("--latent-format", choices=LATENT_FORMATS, default="flux2")
    return parser


def _png_paths(path: Path, batch: int) -> list[Path]:
    if batch == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(batch)]


def write_pngs(path: Path, images: torch.Tensor) -> list[Path]:
    """Images [B, 3, H, W] in about [-1, 1] -> 8-bit RGB PNGs."""
    from PIL import Image

    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    paths = _png_paths(path, pixels.shape[0])
    for target, array in zip(paths, pixels):
        with atomic_output(target) as partial:
            Image.fromarray(np.ascontiguousarray(array)).save(partial, format="PNG")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        latents = read_latents(args.input)
        with Upscaler.load(args.artifacts, backend=args.backend, device=args.device) as upscaler:
            latents = latents.to(upscaler.device)
            upscaler.check_input(latents, args.scale, decode=args.decode is not None, latent_format=args.latent_format)
            out = upscaler.upscale(latents, scale=args.scale, seed=args.seed, latent_format=args.latent_format)
            images = upscaler.decode(out, latent_format=args.latent_format) if args.decode else None
            backend = upscaler.backend_name
        write_latents(args.output, out)
        written = [args.output] + (write_pngs(args.decode, images) if images is not None else [])
    except (InvalidLatentsError, ManifestError, BackendUnavailable, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{tuple(latents.shape)} -> {tuple(out.shape)} ({args.scale}x, backend {backend}); wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
