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

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engines.errors import FlowUpscalerError
from runtime.backends import OnnxRuntimeBackend
from runtime.metrics import difference
from runtime.noise import CpuNoise
from runtime.numerics import full_fp32
from runtime.upscale_pass import run_pass

from .data import CalibrationSet
from .thresholds import THRESHOLDS, Thresholds

Run = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
# The fp32 eager pass the candidate is held to: (latents_small, seed) -> x0. The build side makes
# it from the model (export.reference.pass_reference), so calib needs nothing of export.
Reference = Callable[[torch.Tensor, int], torch.Tensor]
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
    reference: Reference,
    calibration: CalibrationSet,
    precision: str,
    decoder: torch.nn.Module | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> AccuracyReport:
    """Compare the candidate ``run`` (a runtime backend's ``run``: a folder's engines, or any graphs
    through ``OnnxRuntimeBackend``) with the fp32 eager ``reference`` pass."""
    if precision not in THRESHOLDS:
        raise ValueError(f"no accuracy thresholds for precision {precision!r}; known: {', '.join(THRESHOLDS)}")
    report = AccuracyReport(precision, THRESHOLDS[precision])
    for index, latents in enumerate(calibration.samples):
        with torch.inference_mode(), full_fp32():  # the reference and its decoder in IEEE fp32
            expected = reference(latents, seed + index)
            got = run_pass(run, latents.to(device), CpuNoise(seed + index, device)).cpu()
            figures = difference(got, expected)
            sample = {
                "shape": list(latents.shape[2:]),
                "rel_l2": figures.rel_l2,
                "max_abs": figures.max_abs,
                "finite": figures.finite,
                "psnr_db": None,
            }
            if decoder is not None and sample["finite"]:
                sample["psnr_db"] = psnr(decoder(_centre(got)), decoder(_centre(expected)))
        report.samples.append(sample)
    return report


def graphs_run(graphs: dict[str, Path]) -> Run:
    """``run`` of ONNX graph files in ONNX Runtime on the CPU, through the runtime's own backend."""
    return OnnxRuntimeBackend(graphs, torch.device("cpu")).run
