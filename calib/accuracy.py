"""The accuracy gate: one 2x pass of candidate graphs or engines against the fp32 eager reference.

On every calibration sample, both run the same pass with the same seeded noise (the runtime's
convention), and the candidate's output latent ``x0`` is compared with the reference's:
``rel_l2 = ||x0 - ref|| / ||ref||`` and ``max_abs``. With a VAE, both latents are decoded by the
same fp32 eager decoder and compared as images (PSNR over the [-1, 1] range, peak-to-peak 2), so
the figure is the upscaler's loss alone; the decoder's own precision is validated per graph. Only
the central 16x16 latent pixels are decoded: a full-size decode on a CPU costs seconds per image,
and both sides get the same crop, so the comparison stays like for like.
The gate takes the worst sample of each figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engines.cli import SEED_RANGE, int_in_range, run_cli
from engines.errors import FlowUpscalerError
from engines.files import atomic_output, check_output_file
from runtime.backends import OnnxRuntimeBackend
from runtime.metrics import difference
from runtime.noise import CpuNoise
from runtime.numerics import full_fp32
from runtime.upscale_pass import run_pass

from .data import (
    CalibrationSet,
    add_calibration_arguments,
    calibration_from_args,
)
from .thresholds import THRESHOLDS, Thresholds

Run = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
IMAGE_PEAK_TO_PEAK = 2.0
DECODE_CROP = 16  # latent pixels: the PSNR is taken on the central 128x128 px, decoded alone, of both outputs


class AccuracyGateError(FlowUpscalerError, RuntimeError):
    """The candidate is further from the fp32 reference than its precision allows."""


@dataclass
class AccuracyReport:
    precision: str
    thresholds: Thresholds
    samples: list[dict] = field(default_factory=list)

    @property
    def worst(self) -> dict:
        worst = {"rel_l2": max(s["rel_l2"] for s in self.samples), "max_abs": max(s["max_abs"] for s in self.samples)}
        psnrs = [s["psnr_db"] for s in self.samples if s.get("psnr_db") is not None]
        worst["psnr_db"] = min(psnrs) if psnrs else None
        return worst

    @property
    def failures(self) -> list[str]:
        worst, limit = self.worst, self.thresholds
        failures = []
        if not all(s["finite"] for s in self.samples):
            failures.append("non-finite values in the output")
        if not worst["rel_l2"] <= limit.rel_l2:
            failures.append(f"rel-L2 {worst['rel_l2']:.3g} > {limit.rel_l2:g}")
        if not worst["max_abs"] <= limit.max_abs:
            failures.append(f"max-abs {worst['max_abs']:.3g} > {limit.max_abs:g}")
        if worst["psnr_db"] is not None and not worst["psnr_db"] >= limit.psnr_db:
            failures.append(f"decoded PSNR {worst['psnr_db']:.1f} dB < {limit.psnr_db:g} dB")
        return failures

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        worst = self.worst
        psnr = f", decoded PSNR {worst['psnr_db']:.1f} dB" if worst["psnr_db"] is not None else ""
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures)
        return (f"{self.precision} accuracy over {len(self.samples)} sample(s), worst: rel-L2 {worst['rel_l2']:.3g}, "
                f"max-abs {worst['max_abs']:.3g}{psnr} -> {verdict}")

    def to_dict(self) -> dict:
        return {"precision": self.precision, "passed": self.passed, "failures": self.failures, "worst": self.worst,
                "thresholds": asdict(self.thresholds), "samples": self.samples}

    def check(self) -> None:
        if not self.passed:
            limits = ", ".join(f"{k} {v:g}" for k, v in asdict(self.thresholds).items())
            raise AccuracyGateError(f"{self.summary()}. The {self.precision} limits (worst sample) are {limits}.")


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(((image.double() - reference.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(IMAGE_PEAK_TO_PEAK**2 / mse)


def _centre(latents: torch.Tensor) -> torch.Tensor:
    h, w = latents.shape[2:]
    top, left = (h - min(h, DECODE_CROP)) // 2, (w - min(w, DECODE_CROP)) // 2
    return latents[:, :, top : top + DECODE_CROP, left : left + DECODE_CROP]


def measure(
    run: Run,
    unet: torch.nn.Module,
    calibration: CalibrationSet,
    precision: str,
    decoder: torch.nn.Module | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> AccuracyReport:
    """Compare the candidate ``run`` (a runtime backend's ``run``: a folder's engines, or any graphs
    through ``OnnxRuntimeBackend``) with fp32 eager."""
    from export.reference import upscale as reference_upscale

    if precision not in THRESHOLDS:
        raise ValueError(f"no accuracy thresholds for precision {precision!r}; known: {', '.join(THRESHOLDS)}")
    report = AccuracyReport(precision, THRESHOLDS[precision])
    unet = unet.eval()
    for index, latents in enumerate(calibration.samples):
        with torch.inference_mode(), full_fp32():  # the reference and its decoder in IEEE fp32
            reference = reference_upscale(unet, latents, scale=2, seed=seed + index)
            got = run_pass(run, latents.to(device), CpuNoise(seed + index, device)).cpu()
            figures = difference(got, reference)
            sample = {
                "shape": list(latents.shape[2:]),
                "rel_l2": figures.rel_l2,
                "max_abs": figures.max_abs,
                "finite": figures.finite,
                "psnr_db": None,
            }
            if decoder is not None and sample["finite"]:
                sample["psnr_db"] = psnr(decoder(_centre(got)), decoder(_centre(reference)))
        report.samples.append(sample)
    return report


def graphs_run(graphs: dict[str, Path]) -> Run:
    """``run`` of ONNX graph files in ONNX Runtime on the CPU, through the runtime's own backend."""
    return OnnxRuntimeBackend(graphs, torch.device("cpu")).run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m calib.accuracy",
        description="Gate an artifact folder's graphs or engines: one 2x pass on each calibration sample through "
                    "the runtime backend against the fp32 eager model rebuilt from the folder's weight record. "
                    "Prints the worst latent rel-L2 and max-abs (and decoded PSNR with --decoded-psnr); "
                    "exit 1 if over the precision's limits.",
    )
    parser.add_argument("artifacts", type=Path, help="artifact folder from python -m export.build")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "onnxruntime-tensorrt", "tensorrt"),
                        help="what runs the candidate: the folder's ONNX graphs or its TensorRT engines")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    parser.add_argument("--precision", choices=sorted(THRESHOLDS),
                        help="whose limits apply (default: the folder's unet precision)")
    parser.add_argument("--decoded-psnr", action="store_true", help="decode both outputs with the fp32 VAE too")
    parser.add_argument("--seed", type=int_in_range(*SEED_RANGE), default=0, help=f"seed of the pass noise, 0..{SEED_RANGE[1]}")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    add_calibration_arguments(parser, default_size=4)
    return parser


def accuracy_command(argv: list[str] | None = None) -> int:
    from engines.manifest import ManifestError
    from export.models.weights_record import models_from_weights_record
    from export.onnx.components import COMPONENTS as SPECS
    from runtime import Upscaler

    args = build_parser().parse_args(argv)
    if args.json:
        check_output_file(args.json, "--json", protected=args.artifacts)
    with Upscaler.load(args.artifacts, backend=args.backend, device=args.device) as upscaler:
        manifest = upscaler.manifest
        precision = args.precision or manifest.components["unet"].precision
        smallest = min(p.min["latents_small"][2] for p in manifest.components["cond_encoder"].profiles)
        calibration = calibration_from_args(args, min_side=smallest)
        for sample in calibration.samples:
            upscaler.check_input(sample, 2)
        components = ["cond_encoder", "unet"] + (["vae_decoder"] if args.decoded_psnr else [])
        try:
            models = models_from_weights_record(manifest.weights, components)
        except ValueError as exc:  # no weight source recorded, or other weights than the folder's
            raise ManifestError(str(exc)) from exc
        decoder = SPECS["vae_decoder"].module(models) if args.decoded_psnr else None
        report = measure(upscaler.backend.run, models.unet, calibration, precision, decoder, args.seed, upscaler.device)
    print(f"{args.artifacts} ({upscaler.backend_name}, {calibration.describe()['source']}): {report.summary()}")
    if args.json:
        with atomic_output(args.json) as partial:
            partial.write_text(json.dumps({"calibration": calibration.describe(), **report.to_dict()}, indent=2) + "\n")
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals are one ``error:`` line and exit 1; a gate
    over its limits prints its numbers and exits 1 too."""
    return run_cli(accuracy_command, argv)


if __name__ == "__main__":
    sys.exit(main())
