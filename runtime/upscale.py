"""``python -m runtime.upscale``: upscale a latent file with an artifact folder.

Everything the command can refuse is refused before any model is loaded or run: the seed, the
device, the input file, and every output path (its folder exists and takes a file, it is not a
folder, not inside the artifact folder, not the input, not another output). Outputs are written
together at the end, each to a temporary file renamed into place only when all of them are
complete, so a failure leaves no output (and the previous files, if any, unchanged).
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from engines.cli import run_cli
from engines.files import OutputPathError, atomic_output, check_output_file

from .latents import read_latents
from .tiling import rgb8
from .inputs import LATENT_FORMATS, SEED_MAX, check_seed, resolve_device
from .selection import BACKENDS
from .upscaler import Upscaler

IMAGE_SUFFIX = ".png"


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
    parser.add_argument(
        "--seed", type=int, default=0,
        help=f"noise seed, 0..{SEED_MAX} (2**64-1) (same seed, same result on every backend)",
    )
    parser.add_argument("--decode", type=Path, help="also decode to this PNG (batch > 1: NAME_0.png, NAME_1.png, ...)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    parser.add_argument(
        "--latent-format", choices=LATENT_FORMATS, default="flux2",
        help="flux2: normalised [B, 32, h, w]; flux2_packed: ComfyUI's [B, 128, h/2, w/2]; flux2_vae: raw VAE "
             "latents [B, 32, h, w] (Flux2KleinPipeline's output), normalised with the folder's statistics; "
             "the output keeps the input's form")
    return parser


def _png_paths(path: Path, batch: int) -> list[Path]:
    if batch == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(batch)]


def _check_distinct(paths: dict[str, Path]) -> None:
    seen: dict[Path, str] = {}
    for what, resolved in paths.items():
        if resolved in seen:
            raise OutputPathError(f"{what} and {seen[resolved]} are the same file {resolved}; give different paths")
        seen[resolved] = what


def write_outputs(output: Path, latents: torch.Tensor, png_paths: list[Path] | None = None,
                  images: torch.Tensor | None = None) -> list[Path]:
    """Write the latents (and the PNGs) together: every file goes to a temporary name first and is
    renamed into place only after all of them were written, so a failure leaves none of them."""
    from PIL import Image
    from safetensors.torch import save_file

    written = [output]
    with ExitStack() as stack:  # on exit, renames in reverse order: the latents last
        partial = stack.enter_context(atomic_output(output))
        save_file({"latents": latents.detach().cpu().contiguous()}, str(partial))
        if images is not None:
            arrays = rgb8(images)
            for target, array in zip(png_paths, arrays):
                partial = stack.enter_context(atomic_output(target))
                Image.fromarray(np.ascontiguousarray(array)).save(partial, format="PNG")
                written.append(target)
    return written


def upscale_command(argv: list[str] | None = None) -> int:
    """The command; raises the project's exceptions (``main`` turns them into exit codes)."""
    args = build_parser().parse_args(argv)
    seed = check_seed(args.seed, "--seed")
    device = resolve_device(args.device, "--device")
    if args.decode is not None and args.decode.suffix.lower() != IMAGE_SUFFIX:
        raise OutputPathError(
            f"--decode writes PNG images; give a path ending in {IMAGE_SUFFIX}, got {args.decode}"
        )
    outputs = {"--output": check_output_file(args.output, "--output", args.artifacts, args.input)}
    if args.decode is not None:
        outputs["--decode"] = check_output_file(args.decode, "--decode", args.artifacts, args.input)
    _check_distinct(outputs)
    latents = read_latents(args.input)
    png_paths = None
    if args.decode is not None:
        png_paths = _png_paths(args.decode, max(1, latents.shape[0]) if latents.dim() == 4 else 1)
        if len(png_paths) > 1:  # batch > 1: the numbered names are what will be written
            del outputs["--decode"]
            for path in png_paths:
                outputs[f"--decode ({path.name})"] = check_output_file(path, "--decode", args.artifacts, args.input)
            _check_distinct(outputs)

    with Upscaler.load(args.artifacts, backend=args.backend, device=device) as upscaler:
        latents = latents.to(upscaler.device)
        upscaler.check_input(latents, args.scale, decode=args.decode is not None, latent_format=args.latent_format)
        out = upscaler.upscale(latents, scale=args.scale, seed=seed, latent_format=args.latent_format)
        images = upscaler.decode(out, latent_format=args.latent_format) if args.decode else None
        backend, skipped = upscaler.backend_name, upscaler.skipped_backends
    written = write_outputs(args.output, out, png_paths, images)
    note = f", auto skipped {', '.join(skipped)}" if skipped else ""
    print(
        f"{tuple(latents.shape)} -> {tuple(out.shape)} ({args.scale}x, backend {backend}{note}); "
        f"wrote {', '.join(map(str, written))}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals are one ``error:`` line and exit 1."""
    return run_cli(upscale_command, argv)


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _log_to_stderr() -> None:
    """Library warnings (a backend ``auto`` skipped, and why) as ``warning: ...`` lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


if __name__ == "__main__":
    _log_to_stderr()
    sys.exit(main())
