"""``python -m export.quantize``: quantize cond_encoder and unet to Q/DQ ONNX (``calib.quantize``) on
a calibration set and gate the pass, outside a build (the build's quantize stage does the same)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calib.data import add_calibration_arguments, calibration_from_args
from calib.quantize import CPU_INT8, CPU_KEEP, DEFAULT_KEEP, ENCODINGS, KEEP_GROUPS, keep_groups
from engines.cli import SEED_RANGE, int_in_range, run_cli
from engines.files import atomic_output
from engines.targets import PRESETS, TargetError

from .checkpoint import add_weight_arguments, load_unet, load_vae
from .onnx.components import Models
from .pipeline.quantize import quantize_components


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.quantize",
        description="Quantize cond_encoder and unet to INT8 or FP8 Q/DQ ONNX (ONNX Runtime static quantization, "
                    "symmetric, per-channel weights) on a calibration set, then gate one 2x pass against the fp32 "
                    "eager model. Writes OUT/cond_encoder.<precision>.onnx, OUT/unet.<precision>.onnx and "
                    "OUT/quantize.<precision>.json only if the gate passes; exit 1 with the numbers if it fails.",
    )
    parser.add_argument("--precision", required=True, choices=tuple(ENCODINGS),
                        help=f"int8 or fp8 for TensorRT; {CPU_INT8}: int8 with uint8 activations and an fp32 float part "
                             "for ONNX Runtime's CPU provider, held to the bf16 accuracy limits")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--target", choices=sorted(PRESETS), help="GPU preset: refuse a precision it cannot run "
                        "(fp8 needs compute capability >= 8.9)")
    parser.add_argument("--keep", type=keep_groups, default=None,
                        help=f"node groups kept in float: comma-separated {','.join(KEEP_GROUPS)}, or none "
                             f"(default: all; {CPU_INT8}: {','.join(CPU_KEEP)}, as the build makes them)")
    add_weight_arguments(parser, with_vae=True)
    parser.add_argument("--seed", type=int_in_range(*SEED_RANGE), default=0, help=f"seed of --random-weights and of the pass noise, 0..{SEED_RANGE[1]}")
    parser.add_argument("--decoded-psnr", action="store_true",
                        help="also decode both outputs with the fp32 VAE and gate the PSNR (loads the VAE)")
    add_calibration_arguments(parser)
    return parser


def quantize_command(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.target and args.precision == CPU_INT8:
        parser.error(f"--target names a GPU; {CPU_INT8} graphs are for ONNX Runtime's CPU provider: leave --target out")
    if args.keep is None:
        args.keep = list(CPU_KEEP if args.precision == CPU_INT8 else DEFAULT_KEEP)
    if args.target:
        try:
            PRESETS[args.target].check_precision(args.precision)
        except TargetError as exc:
            parser.error(str(exc))
    calibration = calibration_from_args(args)
    models = Models(unet=load_unet(args.checkpoint, random_weights=args.random_weights, seed=args.seed))
    if args.decoded_psnr:
        models.vae = load_vae(args.vae, random_weights=args.random_weights, seed=args.seed)
    print(f"calibration: {calibration.describe()['source']}, {len(calibration.samples)} sample(s)")
    results, report = quantize_components(models, args.precision, calibration, args.out, args.keep, args.seed)
    summary = {"precision": args.precision, "calibration": calibration.describe(),
               "graphs": {c: r.to_dict() for c, r in results.items()}, "accuracy": report.to_dict()}
    with atomic_output(args.out / f"quantize.{args.precision}.json") as partial:
        partial.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {', '.join(str(r.path) for r in results.values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals, a failed gate included, are one ``error:``
    line and exit 1."""
    return run_cli(quantize_command, argv)


if __name__ == "__main__":
    sys.exit(main())
