"""``python -m export.accuracy``: the accuracy gate (``calib.accuracy``) on a built folder, through a
runtime backend, against the fp32 eager model rebuilt from the folder's weight record."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calib.accuracy import THRESHOLDS, measure
from calib.data import add_calibration_arguments, calibration_from_args
from engines.cli import SEED_RANGE, int_in_range, run_cli
from engines.files import atomic_output, check_output_file
from runtime import Upscaler
from runtime.upscale_pass import PASS_COMPONENTS

from .models.weights_record import models_from_weights_record
from .onnx.components import COMPONENTS
from .reference import pass_reference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.accuracy",
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
        components = [*PASS_COMPONENTS, *(["vae_decoder"] if args.decoded_psnr else [])]
        models = models_from_weights_record(manifest.weights, components)
        decoder = COMPONENTS["vae_decoder"].module(models) if args.decoded_psnr else None
        report = measure(upscaler.backend.run, pass_reference(models.unet), calibration, precision, decoder, args.seed,
                         upscaler.device)
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
