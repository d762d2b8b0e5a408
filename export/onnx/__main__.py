"""``python -m export.onnx``: export components to ONNX and validate them against fp32 eager."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from ..checkpoint import add_weight_arguments, load_unet, load_vae
from engines.cli import SEED_RANGE, int_in_range, run_cli
from engines.errors import FlowUpscalerError
from engines.files import atomic_output
from engines.requirements import onnxruntime_missing
from ..models import DECODER_CUTS
from .components import COMPONENTS, DEFAULT_CUT, Models
from .exporter import OPSET, export_component, graph_filename
from ..models.precision import DTYPES
from .validate import validate_graph


class OnnxExportError(FlowUpscalerError, RuntimeError):
    """The export cannot run here, or a graph failed validation (its report is kept, the graph not)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.onnx",
        description=(
            "Export Flow Upscaler components to ONNX (opset %d, dynamic batch/height/width), "
            "clean them up, and validate them in ONNX Runtime (CPU) against the fp32 eager model. "
            "Writes DIR/<component>.<dtype>.onnx and DIR/<component>.<dtype>.validation.json. "
            "A graph that fails validation is not kept (its JSON is) and the exit code is 1."
        )
        % OPSET,
    )
    parser.add_argument(
        "--component",
        nargs="+",
        required=True,
        choices=sorted(COMPONENTS),
        help="cond_encoder: (latents_small, timestep) -> (cond, lr1, lr2, lr3); "
        "unet: (sample, cond, lr1, lr2, lr3) -> velocity; vae_decoder: normalised latents -> image; "
        "vae_decoder_tail: decoder features after --cut -> image",
    )
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_weight_arguments(parser, with_vae=True)
    parser.add_argument("--cut", default=DEFAULT_CUT, choices=sorted(DECODER_CUTS), help="decoder cut for vae_decoder_tail")
    parser.add_argument("--seed", type=int_in_range(*SEED_RANGE), default=0, help=f"seed of --random-weights, 0..{SEED_RANGE[1]}")
    return parser


def load_models(args: argparse.Namespace, components: list[str]) -> Models:
    needs = {COMPONENTS[name].needs for name in components}
    models = Models(cut=args.cut)
    if "unet" in needs:
        models.unet = load_unet(args.checkpoint, random_weights=args.random_weights, seed=args.seed)
    if "vae" in needs:
        models.vae = load_vae(args.vae, random_weights=args.random_weights, seed=args.seed)
    return models


def export_and_validate(models: Models, component: str, dtype: str, out: Path) -> dict:
    """Export into a staging folder, validate, and move the graph into ``out`` unless it failed."""
    spec = COMPONENTS[component]
    name = graph_filename(spec, dtype, models.cut)
    staging = out / ".staging"
    result = export_component(spec, models, dtype, staging / name)
    report = validate_graph(spec, models, str(result.path), dtype)
    report.update(
        file=name,
        opset=OPSET,
        export_seconds=round(result.export_seconds, 2),
        cleanup_seconds=round(result.cleanup_seconds, 2),
        nodes_exported=result.nodes_exported,
        nodes_final=result.nodes_final,
    )
    if report["status"] == "failed":
        result.path.unlink()
    else:
        os.replace(result.path, out / name)
    report_path = out / name.replace(".onnx", ".validation.json")
    with atomic_output(report_path) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _summary(report: dict) -> str:
    worst = max(
        (o["rel_l2"] for check in report["checks"] for o in check["outputs"].values()), default=None
    )
    error = f", worst rel-L2 {worst:.2e}" if worst is not None else ""
    reason = f" ({report['reason']})" if report["status"] == "not_run" else ""
    return (
        f"{report['file']}: {report['status']}{reason}{error}; {report['nodes_final']} nodes, "
        f"exported in {report['export_seconds']:.1f} s"
    )


def export_command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    components = list(dict.fromkeys(args.component))
    missing = onnxruntime_missing()
    if missing:
        raise OnnxExportError(missing)
    models = load_models(args, components)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    try:
        for component in components:
            for dtype in dict.fromkeys(args.dtype):
                print(f"exporting {component} ({dtype}) ...", flush=True)
                report = export_and_validate(models, component, dtype, args.out)
                print("  " + _summary(report), flush=True)
                if report["status"] == "failed":
                    failed.append(report["file"])
    finally:
        shutil.rmtree(args.out / ".staging", ignore_errors=True)
    if failed:
        raise OnnxExportError(f"validation failed for {', '.join(failed)} (errors above the tolerances; "
                              f"see the .validation.json files in {args.out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals are one ``error:`` line and exit 1."""
    return run_cli(export_command, argv)


if __name__ == "__main__":
    sys.exit(main())
