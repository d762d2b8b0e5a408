"""Calibration sets: the low-res latents that quantization ranges and the accuracy gate are taken on.

User latents come from ``.safetensors`` files (a folder, files, or both), one tensor each (or one
named ``latents``), in the unpacked 32-channel form or ComfyUI's packed 128-channel form, any batch.
Selection is deterministic: files in sorted path order, batches split into samples, then ``size``
samples drawn by a seeded permutation (kept in their original order).

The fallback when no files are given is seeded standard-normal latents. Why that is half
representative: the inputs of a Flow Upscaler pass are BN-normalised FLUX.2 latents, which have
roughly zero mean and unit variance per channel, and the U-Net's ``sample`` input is pure Gaussian
noise at t = 1000 whatever the user gives; so the ranges of the first layers and of the noise path
match. What noise lacks is the spatial structure and the heavier-tailed channel statistics of real
latents, which shape the low-res encoder's features (``cond``, ``lr1..3``) and so the deeper
activations. Calibrate on a few dozen real latents for an artifact that ships.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.cli import SEED_RANGE, int_in_range
from engines.errors import FlowUpscalerError
from runtime.latents import (
    LATENT_CHANNELS,
    PACKED_CHANNELS,
    InvalidLatentsError,
    read_latents,
    unpack,
    validate_latents,
)

DEFAULT_SIZE = 8
MAX_CALIBRATION_SIZE = 10_000
DEFAULT_SIDE = 32  # low-res latent side of the fallback: a 256 px image, 512 px out


class CalibrationError(FlowUpscalerError, ValueError):
    """Calibration files that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class CalibrationSet:
    """Low-res latents [1, 32, h, w] fp32, and where they came from."""

    samples: tuple[torch.Tensor, ...]
    source: str

    def digest(self) -> str:
        """sha256 over the samples' shapes and values: the identity of a calibration."""
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(str(tuple(sample.shape)).encode())
            digest.update(sample.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def describe(self) -> dict:
        shapes = sorted({tuple(s.shape[2:]) for s in self.samples})
        return {"source": self.source, "samples": len(self.samples), "sides": [list(s) for s in shapes],
                "sha256": self.digest()}


def _files(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.safetensors"))
            if not found:
                raise CalibrationError(f"{path} holds no .safetensors files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise CalibrationError(f"{path} does not exist")
    return sorted(dict.fromkeys(files))


def _samples_of(path: Path) -> list[torch.Tensor]:
    try:
        latents = read_latents(path)
        if latents.dim() == 4 and latents.shape[1] == PACKED_CHANNELS:
            latents = unpack(latents)
        latents = latents.float()
        validate_latents(latents, name=str(path))
    except InvalidLatentsError as exc:
        raise CalibrationError(f"{exc} (calibration latents must be [B, {LATENT_CHANNELS}, H, W] or packed "
                               f"[B, {PACKED_CHANNELS}, H/2, W/2])") from exc
    return [sample[None] for sample in latents]


def load_calibration_set(
    paths: list[Path] | None = None, size: int = DEFAULT_SIZE, seed: int = 0, side: int = DEFAULT_SIDE
) -> CalibrationSet:
    """``size`` samples from ``paths`` (files or folders of ``.safetensors``), or the noise fallback."""
    if size < 1:
        raise CalibrationError(f"the calibration size must be at least 1, got {size}")
    if not paths:
        if side < 2 or side % 2:
            raise CalibrationError(f"the fallback latent side must be even and at least 2, got {side}")
        generator = torch.Generator().manual_seed(seed)
        samples = tuple(torch.randn(1, LATENT_CHANNELS, side, side, generator=generator) for _ in range(size))
        return CalibrationSet(samples, f"fallback: standard normal, seed {seed}, {side}x{side}")
    files = _files(list(paths))
    samples = [s for path in files for s in _samples_of(path)]
    if len(samples) > size:
        chosen = sorted(torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:size].tolist())
        samples = [samples[i] for i in chosen]
    return CalibrationSet(tuple(samples), f"{len(files)} file(s): {', '.join(str(f) for f in files[:3])}"
                          + (", ..." if len(files) > 3 else ""))


def add_calibration_arguments(parser: argparse.ArgumentParser, default_size: int = DEFAULT_SIZE) -> None:
    """``--calib``, ``--calib-size``, ``--calib-seed``, ``--calib-side``, shared by every command."""
    parser.add_argument("--calib", type=Path, nargs="+", metavar="PATH",
                        help="calibration latents: .safetensors files and/or folders of them (default: seeded "
                             "standard-normal latents, see calib/data.py for why that is only half representative)")
    parser.add_argument("--calib-size", type=int_in_range(1, MAX_CALIBRATION_SIZE), default=default_size,
                        help=f"number of calibration samples, 1..{MAX_CALIBRATION_SIZE} (default: %(default)s)")
    parser.add_argument("--calib-seed", type=int_in_range(*SEED_RANGE), default=0,
                        help=f"seed of the selection and of the fallback, 0..{SEED_RANGE[1]}")
    parser.add_argument("--calib-side", type=int_in_range(2, 4096),
                        help=f"low-res latent side of the fallback samples, even, 2..4096 (default: {DEFAULT_SIDE} = "
                             f"{DEFAULT_SIDE * 8} px in, or the smallest an artifact folder accepts)")


def calibration_from_args(args: argparse.Namespace, min_side: int = 0) -> CalibrationSet:
    side = args.calib_side or max(DEFAULT_SIDE, min_side)
    return load_calibration_set(args.calib, args.calib_size, args.calib_seed, side)
