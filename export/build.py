"""``python -m export.build``: the command that builds an artifact folder for one GPU.

It parses the command line into ``BuildSettings``, loads the weights and runs the pipeline's
driver (``export.pipeline.driver.build_artifacts``): export + validate each ONNX graph, quantize
(int8/fp8), derive the optimisation profiles, build the engines where TensorRT and the target GPU
are present, gate the pass, and write the manifest. Without TensorRT the command still finishes
the ONNX stages and writes a manifest with the engines marked as not built, so the folder can be
copied to the target machine and completed there.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from engines.cli import SEED_RANGE, float_in_range, int_in_range, run_cli
from engines.flavours import FLAVOURS, FlavourError
from engines.manifest import Manifest
from engines.requirements import onnxruntime_missing
from engines.profiles import MAX_BATCH, ProfileError
from engines.targets import PRESETS, TARGET_CHOICES, Target, TargetError, get_target
from engines.tensorrt_build import BuildOptions

from calib.data import DEFAULT_SIDE, add_calibration_arguments, calibration_from_args
from calib.quantize import DEFAULT_KEEP, KEEP_GROUPS, QUANTIZED_PRECISIONS, keep_groups
from runtime.upscale_pass import PASS_COMPONENTS

from .checkpoint import add_weight_arguments, load_unet, load_vae
from .onnx.components import Models
from .pipeline.driver import build_artifacts
from .pipeline.engine import EngineHost, engine_flavour
from .pipeline.errors import BuildError
from .pipeline.folder import check_output_folder
from .pipeline.profiles import check_range, latent_ranges
from .pipeline.settings import BUILD_COMPONENTS, CALIBRATION_SIZE, BuildSettings

MAX_SIDE_PX = 65536  # image side: far beyond any GPU's memory, small enough to keep the maths exact
MAX_BATCH_LIMIT = 64  # profiles are searched batch by batch down from this


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.build",
        description=(
            "Build a Flow Upscaler artifact folder for one GPU: ONNX graphs validated against the fp32 "
            "eager model, TensorRT engines with per-octave optimisation profiles (when TensorRT and the "
            "target GPU are present), manifest.json and report.json. Unchanged inputs reuse earlier "
            "artifacts. Exit codes: 0 done (engines may be marked not built), 1 a stage failed, 2 bad usage."
        ),
    )
    parser.add_argument(
        "--target",
        required=True,
        choices=TARGET_CHOICES,
        help="GPU preset (%s) or auto (the local GPU)" % ", ".join(PRESETS),
    )
    add_weight_arguments(parser, with_vae=True)
    parser.add_argument(
        "--precision",
        choices=("fp16", "bf16", *QUANTIZED_PRECISIONS),
        help="cond_encoder and unet precision (default: the target's, fp16). int8 and fp8 (compute capability "
        ">= 8.9) quantize on the calibration set and must pass the accuracy gate, or nothing is written",
    )
    parser.add_argument(
        "--vae-precision",
        choices=("fp32", "fp16", "bf16"),
        help="VAE decoder precision (default: bf16 where supported, else fp32; fp16 can overflow)",
    )
    parser.add_argument("--out", type=Path, help="artifact folder (default: build/<target>)")
    parser.add_argument(
        "--components", nargs="+", choices=BUILD_COMPONENTS, default=list(BUILD_COMPONENTS), help="what to build"
    )
    parser.add_argument("--min-px", type=int_in_range(16, MAX_SIDE_PX),
                        help=f"smallest input image side in pixels, a multiple of 16 from 16 to {MAX_SIDE_PX} (default: 512)")
    parser.add_argument("--max-px", type=int_in_range(32, MAX_SIDE_PX),
                        help=f"largest output image side in pixels, a multiple of 32 from 32 to {MAX_SIDE_PX} "
                             "(default: 8192)")
    parser.add_argument("--max-batch", type=int_in_range(1, MAX_BATCH_LIMIT), default=MAX_BATCH,
                        help=f"batch limit of every profile, 1..{MAX_BATCH_LIMIT} (default: %(default)s)")
    parser.add_argument("--opt-level", type=int, default=3, choices=range(6), help="TensorRT builder optimisation level")
    parser.add_argument("--workspace-gib", type=float_in_range(0, 1024),
                        help="TensorRT workspace memory limit in GiB, more than 0 up to 1024 (default: TensorRT's)")
    parser.add_argument("--tf32", action="store_true",
                        help="let TensorRT run fp32 layers (an fp32 VAE, fp8 graphs' float parts) in TF32: faster, "
                             "about fp16's precision. Default: true fp32, recorded in the manifest")
    parser.add_argument(
        "--engine-flavour", choices=tuple(FLAVOURS),
        help="tensorrt-rtx (TensorRT for RTX: builds ahead of time for the target's compute capability on any "
             "machine, GPU or not; RTX targets' default) or tensorrt (TensorRT 10/11: builds on the target GPU "
             "itself; the only one for h100, l40s, a100)")
    parser.add_argument(
        "--require-engines", action="store_true", help="fail unless TensorRT engines can be built on this machine"
    )
    parser.add_argument("--no-wait", action="store_true",
                        help="if another build is writing --out, fail at once (exit 1) instead of waiting for it to "
                             "finish (the default; one build per folder at a time)")
    parser.add_argument("--seed", type=int_in_range(*SEED_RANGE), default=0,
                        help=f"seed of --random-weights and of the gate's pass noise, 0..{SEED_RANGE[1]}")
    parser.add_argument("--keep", type=keep_groups, default=list(DEFAULT_KEEP),
                        help=f"int8/fp8: node groups kept in float, comma-separated {','.join(KEEP_GROUPS)}, or none "
                             "(default: all)")
    parser.add_argument("--cpu-int8", action=argparse.BooleanOptionalAction, default=None,
                        help="also make int8 graphs of cond_encoder and unet for ONNX Runtime's CPU provider (uint8 "
                             "activations, fp32 float part), calibrated on the calibration set and gated against "
                             "fp32 eager at bf16's limits; the runtime's auto runs them on CPUs with int8 dot-product "
                             "units (VNNI, AMX). Default: on when both are built. A gate failure is recorded in the "
                             "manifest, not an error")
    add_calibration_arguments(parser, default_size=CALIBRATION_SIZE)
    return parser


def _rebuild_command(args: argparse.Namespace, target: Target, out: Path) -> str:
    words = ["python", "-m", "export.build", "--target", target.name if target.name in PRESETS else "auto"]
    if args.random_weights:
        words += ["--random-weights", "--seed", str(args.seed)]
    elif args.checkpoint:
        words += ["--checkpoint", args.checkpoint]
    if args.vae and not args.random_weights:
        words += ["--vae", args.vae]
    words += ["--out", str(out), "--components", *args.components]
    for flag, value in (("--precision", args.precision), ("--vae-precision", args.vae_precision),
                        ("--min-px", args.min_px), ("--max-px", args.max_px),
                        ("--workspace-gib", args.workspace_gib)):
        if value is not None:
            words += [flag, str(value)]
    if args.max_batch != MAX_BATCH:
        words += ["--max-batch", str(args.max_batch)]
    if args.calib:  # the same calibration, so the quantized graphs and their gate are reused
        words += ["--calib", *map(str, args.calib)]
    for flag, value, default in (("--calib-size", args.calib_size, CALIBRATION_SIZE), ("--calib-seed", args.calib_seed, 0),
                                 ("--calib-side", args.calib_side, None)):
        if value != default:
            words += [flag, str(value)]
    if sorted(args.keep) != sorted(DEFAULT_KEEP):
        words += ["--keep", ",".join(args.keep) or "none"]
    if args.cpu_int8 is not None:
        words.append("--cpu-int8" if args.cpu_int8 else "--no-cpu-int8")
    if args.opt_level != 3:
        words += ["--opt-level", str(args.opt_level)]
    if args.tf32:
        words.append("--tf32")
    if args.engine_flavour and args.engine_flavour != target.engine_flavours[0]:
        words += ["--engine-flavour", args.engine_flavour]
    return shlex.join(words)


def _load_models(args: argparse.Namespace, components: tuple[str, ...]) -> tuple[Models, dict]:
    """The models, and where their weights came from (for the manifest and the torch backend)."""
    models, sources = Models(), {}
    random = {"source": "random", "seed": args.seed}
    if {"cond_encoder", "unet"} & set(components):
        models.unet = load_unet(args.checkpoint, random_weights=args.random_weights, seed=args.seed)
        sources["unet"] = random if args.random_weights else {"source": args.checkpoint}
    if "vae_decoder" in components:
        models.vae = load_vae(args.vae, random_weights=args.random_weights, seed=args.seed)
        sources["vae"] = random if args.random_weights else {"source": args.vae}
    return models, sources


def _summary(manifest: Manifest, out: Path) -> str:
    lines = [f"wrote {out / 'manifest.json'}"]
    gib = 2**30
    for name, record in manifest.components.items():
        engine = record.engine
        if not engine.built:
            continue
        size = (out / engine.file).stat().st_size / 2**20
        activations = engine.facts.get("activation_bytes_per_profile") or []
        weights = engine.facts.get("weights_bytes", 0)
        estimates = record.memory_estimate_bytes or [0] * len(activations)
        memory = ", ".join(
            f"{p.name} {(a + weights) / gib:.2f} GiB ({a / gib:.2f} activations; ONNX estimate {e / gib:.2f})"
            for p, a, e in zip(record.profiles, activations, estimates)
        )
        lines.append(f"  {engine.file}: {size:.1f} MiB, {FLAVOURS[engine.flavour].title if engine.flavour in FLAVOURS else engine.flavour} "
                     f"{engine.tensorrt_version} for compute capability {engine.compute_capability}"
                     + (f"; memory by profile, weights + activations: {memory}" if memory else ""))
    cpu_graphs = [r.cpu_graph for r in manifest.components.values() if r.cpu_graph is not None]
    if cpu_graphs and all(g.built for g in cpu_graphs):
        accuracy = cpu_graphs[0].validation.get("accuracy", {})
        worst, limits = accuracy.get("worst", {}), accuracy.get("thresholds", {})
        lines.append(f"  CPU graphs ({cpu_graphs[0].precision}, ONNX Runtime's CPU provider): "
                     + ", ".join(g.file for g in cpu_graphs)
                     + (f"; pass x0 rel-L2 {worst['rel_l2']:.3g} vs fp32 eager ({accuracy.get('precision')} limit "
                        f"{limits.get('rel_l2')})" if worst else ""))
    elif cpu_graphs:
        lines.append(f"  CPU graphs ({cpu_graphs[0].precision}) not made: {cpu_graphs[0].reason}")
    unbuilt = [n for n, r in manifest.components.items() if not r.engine.built]
    if unbuilt:
        reason = manifest.components[unbuilt[0]].engine.reason
        lines += [
            f"engines not built ({reason}).",
            f"To finish, copy {out} to a machine with a {manifest.target['gpu']} and TensorRT and run there:",
            f"  {manifest.rebuild_command}",
        ]
    elif any(r.engine.flavour == "tensorrt-rtx" for r in manifest.components.values()):
        lines.append(f"engines built ahead of time: on the {manifest.target['gpu']} they compile their kernels at "
                     f"first load and check themselves against the folder's check set (python -m runtime.check {out})")
    return "\n".join(lines)


def build_command(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        target = get_target(args.target).with_range(args.min_px, args.max_px)
        check_range(target)
    except (TargetError, ProfileError) as exc:
        parser.error(str(exc))
    precision = args.precision or target.default_precision
    vae_precision = args.vae_precision or target.vae_precision
    try:
        target.check_precision(precision)
        target.check_precision(vae_precision)
        flavour = engine_flavour(args.engine_flavour, target)
    except (TargetError, FlavourError) as exc:
        parser.error(str(exc))
    missing = onnxruntime_missing()
    if missing:  # validation, quantization and the memory estimate all run on it
        raise BuildError(missing)
    out = args.out or Path("build") / target.name
    components = tuple(dict.fromkeys(args.components))
    both = set(PASS_COMPONENTS) <= set(components)
    if args.cpu_int8 and not both:
        parser.error("--cpu-int8 quantizes cond_encoder and unet together (the gate runs the whole pass): add both to "
                     "--components, or leave --cpu-int8 out")
    settings = BuildSettings(
        target=target,
        precision=precision,
        vae_precision=vae_precision,
        components=components,
        max_batch=args.max_batch,
        options=BuildOptions(
            optimization_level=args.opt_level,
            workspace_bytes=int(args.workspace_gib * 2**30) if args.workspace_gib else None,
            tf32=args.tf32,
        ),
        require_engines=args.require_engines,
        rebuild_command=_rebuild_command(args, target, out),
        keep=tuple(args.keep),
        seed=args.seed,
        cpu_int8=both if args.cpu_int8 is None else args.cpu_int8,
        engine_flavour=flavour.name,
    )
    check_output_folder(out)
    host = EngineHost.detect(target, flavour)
    if args.require_engines and host.blocker:
        raise BuildError(f"--require-engines: engines cannot be built here: {host.blocker}")
    print(f"target {target.name}: {target.gpu}, compute capability "
          f"{target.compute_capability[0]}.{target.compute_capability[1]}, budget "
          f"{target.memory_budget_bytes / 2**30:.1f} GiB; engines: {flavour.title} "
          f"{host.trt_version or '(not installed)'}; out {out}", flush=True)
    if host.runs_engines_for(target) and args.calib_side is None:
        # Engines are gated inside their own range (ONNX Runtime takes any size): the fallback
        # samples at the smallest input, or the largest if the default side is beyond it.
        lo, hi, _ = latent_ranges(target)["cond_encoder"]
        args.calib_side = min(max(DEFAULT_SIDE, lo), hi)
    settings.calibration = calibration_from_args(args)
    models, settings.weights = _load_models(args, components)
    manifest = build_artifacts(models, settings, out, log=lambda line: print(line, flush=True),
                               wait=not args.no_wait)
    print(_summary(manifest, out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals are one ``error:`` line and exit 1."""
    return run_cli(build_command, argv)


if __name__ == "__main__":
    sys.exit(main())
