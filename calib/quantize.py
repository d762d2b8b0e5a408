"""Post-training quantization of ``cond_encoder`` and ``unet`` to Q/DQ ONNX for strongly typed TensorRT.

Library: ONNX Runtime's ``quantize_static`` in QDQ format. It is already a core dependency, runs
on the CPU (so CI quantizes and checks real graphs), supports INT8 and FP8 (E4M3), and writes the
explicit QuantizeLinear/DequantizeLinear pairs that TensorRT's explicit quantization reads (and
that ONNX Runtime's CPU provider fuses into its integer kernels: the ``cpu-int8`` encoding, see
``ENCODINGS``). NVIDIA
ModelOpt targets the same format with TensorRT-specific placement, but brings a large dependency
tree and mostly helps transformers (SmoothQuant, attention); this U-Net is convolutions only.

What is quantized: the inputs and weights of Conv, Gemm and MatMul nodes, symmetric (zero point 0,
as TensorRT requires), weights per output channel, activations per tensor, biases left in float.
Everything else (GroupNorm, SiLU, Resize, residual adds) stays in the graph's float type. Node
groups kept in float on top (``--keep``), found from the graph's structure, not from names:

- ``first_conv``: the first quantizable node (in graph order) fed by each spatial input: in_conv,
  and the first FiLM convolution of each of lr1..3;
- ``last_conv``: the last quantizable node feeding each output: out_conv, the last convolution
  before each of lr1..3;
- ``time_embedding``: quantizable nodes that see no spatial input (the timestep MLP and the
  per-block projections of ``cond``): negligible work, and the most sensitive values (t = 1000).

The float part (what is not quantized) of an int8 graph is the fp16 export (``export.onnx``'s
fp16 policy: fp32 time embedding, GroupNorm statistics and boundary tensors), so a strongly typed
TensorRT build runs it in fp16; Q/DQ scales are fp16 and the opset is raised to 19, which allows
them. The float part of an fp8 graph stays fp32: ONNX Runtime calibrates fp8 with histograms only,
and those fail on fp16 tensors ("too many bins for data range").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from engines.cli import SEED_RANGE, int_in_range, run_cli
from engines.errors import FlowUpscalerError
from engines.files import atomic_output
from engines.logs import quiet_logger
from engines.targets import PRESETS, TargetError
from export.checkpoint import add_weight_arguments

from .accuracy import AccuracyReport, graphs_run, measure
from .data import (
    CalibrationSet,
    add_calibration_arguments,
    calibration_from_args,
)
from .thresholds import CPU_INT8, GATE_OF

QUANTIZED_PRECISIONS = ("int8", "fp8")
COMPONENTS = ("cond_encoder", "unet")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
KEEP_GROUPS = ("first_conv", "last_conv", "time_embedding")
DEFAULT_KEEP = KEEP_GROUPS
QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear with float16 scales and float8 types


@dataclass(frozen=True)
class Encoding:
    """How a quantized pass is written, for the runtime that will run it."""

    tag: str  # in file names and reports
    precision: str  # the quantized type: int8 or fp8
    float_part: str  # the export precision of what stays in float
    unsigned_activations: bool  # uint8 activations with a zero point, else symmetric (zero point 0)
    gate: str  # the accuracy limits (calib.thresholds) the pass is held to


# TensorRT's explicit quantization: symmetric activations, float part in the engine's precision.
# ONNX Runtime's CPU provider fuses Q/DQ convolutions into its integer kernels (MLAS: VNNI, AMX) only
# with uint8 activations and an fp32 float part; that graph replaces the bf16 path on such CPUs, so
# it is held to bf16's limits (benchmarks/results/cpu_latency.md).
ENCODINGS = {
    "int8": Encoding("int8", "int8", "fp16", False, "int8"),
    "fp8": Encoding("fp8", "fp8", "fp32", False, "fp8"),
    CPU_INT8: Encoding(CPU_INT8, "int8", "fp32", True, GATE_OF[CPU_INT8]),
}
FLOAT_PART = {name: ENCODINGS[name].float_part for name in QUANTIZED_PRECISIONS}  # by a graph's precision
# The CPU graphs' groups kept in float: the first convolutions are quantized too. On ONNX Runtime's
# CPU provider the in_conv at the output resolution is a large share of the pass: quantizing it made
# the full-size U-Net 7 % faster (1105 vs 1184 ms, medians of 6 interleaved, 2 Zen 4 cores) for x0
# rel-L2 0.019 instead of 0.017 against fp32 eager (random weights); the gate decides per build.
CPU_KEEP = ("last_conv", "time_embedding")


class QuantizationError(FlowUpscalerError, RuntimeError):
    """Quantization could not run; the message says what to change."""


@dataclass(frozen=True)
class QuantizeResult:
    component: str
    precision: str
    path: Path
    quantized_nodes: int
    kept: dict[str, list[str]]
    seconds: float

    def to_dict(self) -> dict:
        return {"component": self.component, "precision": self.precision, "file": self.path.name,
                "quantized_nodes": self.quantized_nodes, "kept": self.kept, "seconds": round(self.seconds, 2)}


def _rank(value: onnx.ValueInfoProto) -> int:
    return len(value.type.tensor_type.shape.dim)


def kept_nodes(model: onnx.ModelProto, groups: Iterable[str]) -> dict[str, list[str]]:
    """Names of the quantizable nodes in each keep group (see the module docstring)."""
    groups = list(groups)
    unknown = sorted(set(groups) - set(KEEP_GROUPS))
    if unknown:
        raise QuantizationError(f"unknown keep group(s) {', '.join(unknown)}; choose from {', '.join(KEEP_GROUPS)}")
    graph = model.graph
    nodes = list(graph.node)
    candidates = [i for i, n in enumerate(nodes) if n.op_type in QUANTIZED_OPS]
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}

    def descendants(start: set[str]) -> set[int]:
        reached, tensors = set(), set(start)
        for i, node in enumerate(nodes):  # graph nodes are topologically sorted
            if any(name in tensors for name in node.input):
                reached.add(i)
                tensors.update(node.output)
        return reached

    def ancestors(output: str) -> set[int]:
        reached, stack = set(), [output]
        while stack:
            i = producer.get(stack.pop())
            if i is not None and i not in reached:
                reached.add(i)
                stack.extend(nodes[i].input)
        return reached

    spatial_inputs = [v.name for v in graph.input if _rank(v) == 4]
    found: dict[str, set[int]] = {}
    if "first_conv" in groups:
        fed = [descendants({name}) for name in spatial_inputs]
        found["first_conv"] = {min((i for i in candidates if i in reached), default=None) for reached in fed} - {None}
    if "last_conv" in groups:
        feeding = [ancestors(o.name) for o in graph.output]
        found["last_conv"] = {max((i for i in candidates if i in reached), default=None) for reached in feeding} - {None}
    if "time_embedding" in groups:
        spatial = descendants(set(spatial_inputs))
        found["time_embedding"] = {i for i in candidates if i not in spatial}
    return {group: sorted(nodes[i].name for i in found[group]) for group in groups}


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node named, uniquely: the quantizer excludes nodes by name."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
    return model


def calibration_inputs(component: str, models, calibration: CalibrationSet, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Each sample's fp32 inputs of ``component`` in one pass: the eager encoder feeds the U-Net."""
    from export.onnx.components import COMPONENTS as SPECS
    from runtime.upscale_pass import timesteps
    from runtime.noise import CpuNoise

    encoder = SPECS["cond_encoder"].module(models)
    feeds = []
    for index, latents in enumerate(calibration.samples):
        timestep = timesteps(latents.shape[0])
        if component == "cond_encoder":
            feeds.append({"latents_small": latents.numpy(), "timestep": timestep.numpy()})
            continue
        with torch.inference_mode():
            encoded = encoder(latents, timestep)
        noise = CpuNoise(seed + index).next_pass(latents)
        names = SPECS["cond_encoder"].outputs
        feeds.append({"sample": noise.numpy(), **{n: t.float().numpy() for n, t in zip(names, encoded)}})
    return feeds


class _Reader:
    """ONNX Runtime's calibration data reader interface over prepared feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_graph(
    float_graph: Path,
    out: Path,
    component: str,
    precision: str,
    feeds: list[dict[str, np.ndarray]],
    keep: Iterable[str] = DEFAULT_KEEP,
    unsigned_activations: bool = False,
) -> QuantizeResult:
    """Calibrate ``float_graph`` on ``feeds`` (fp32; cast to the graph's input types) and write its
    Q/DQ form to ``out`` (atomically). Activations are symmetric int8/fp8 (TensorRT), or with
    ``unsigned_activations`` uint8 with a zero point (ONNX Runtime's CPU integer kernels); weights
    are symmetric, per output channel, either way."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if precision not in QUANTIZED_PRECISIONS:
        raise QuantizationError(f"precision must be one of {', '.join(QUANTIZED_PRECISIONS)}, got {precision!r}")
    if unsigned_activations and precision != "int8":
        raise QuantizationError(f"unsigned activations are int8 only, got {precision!r}")
    start = time.perf_counter()
    model = _named(onnx.load(str(float_graph)))
    half = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    feeds = [{name: value.astype(np.float16) if name in half else value for name, value in feed.items()}
             for feed in feeds]
    kept = kept_nodes(model, keep)
    model = _with_opset(model, QDQ_OPSET)
    quant_type = QuantType.QInt8 if precision == "int8" else QuantType.QFLOAT8E4M3FN
    activation_type = QuantType.QUInt8 if unsigned_activations else quant_type
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        source = work / "float.onnx"
        onnx.save(model, str(source))
        # the quantizer warns about pre-processing on every call, on the root logger
        with quiet_logger(None):
            with contextlib.redirect_stdout(io.StringIO()):  # and its histogram calibrator prints progress
                quantize_static(
                    str(source), str(work / "qdq.onnx"), _Reader(feeds),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=True,
                    activation_type=activation_type,
                    weight_type=quant_type,
                    nodes_to_exclude=sorted({n for names in kept.values() for n in names}),
                    calibrate_method=CalibrationMethod.MinMax if precision == "int8" else CalibrationMethod.Distribution,
                    extra_options={"ActivationSymmetric": not unsigned_activations, "WeightSymmetric": True,
                                   "QuantizeBias": False},
                )
        quantized = onnx.load(str(work / "qdq.onnx"))
        count = _quantized_nodes(quantized)
        if count == 0:
            raise QuantizationError(f"{component}: no node was quantized (every quantizable node is kept in float)")
        with atomic_output(out) as partial:
            onnx.save(quantized, str(partial))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return QuantizeResult(component, precision, out, count, kept, time.perf_counter() - start)


def _quantized_nodes(model: onnx.ModelProto) -> int:
    """Quantizable nodes that read a dequantized tensor: the ones that will run in int8/fp8."""
    dequantized = {out for n in model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    return sum(1 for n in model.graph.node if n.op_type in QUANTIZED_OPS and dequantized & set(n.input))


def _with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= version:
        return model
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = version  # 18 -> 19 only adds types and options: the graph means the same
    return model

def quantize_components(
    models,
    precision: str,
    calibration: CalibrationSet,
    out: Path,
    keep: Iterable[str] = DEFAULT_KEEP,
    seed: int = 0,
    log=print,
) -> tuple[dict[str, QuantizeResult], AccuracyReport]:
    """Export both pass components (the encoding's float part), quantize them, gate the pass, and
    only then write them. ``precision``: an ``ENCODINGS`` name (int8 and fp8 for TensorRT, cpu-int8
    for ONNX Runtime's CPU provider).

    The graphs are staged beside ``out``; if the gate fails they are deleted and
    ``AccuracyGateError`` carries the numbers, so ``out`` never holds a graph that failed.
    """
    from export.onnx.components import COMPONENTS as SPECS
    from export.onnx.exporter import export_component, graph_filename

    if precision not in ENCODINGS:
        raise QuantizationError(f"precision must be one of {', '.join(ENCODINGS)}, got {precision!r}")
    encoding = ENCODINGS[precision]
    staging = out / ".staging-quantize"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    results = {}
    try:
        for component in COMPONENTS:
            spec = SPECS[component]
            start = time.perf_counter()
            float_part = encoding.float_part
            graph = export_component(spec, models, float_part, staging / graph_filename(spec, float_part, models.cut)).path
            feeds = calibration_inputs(component, models, calibration, seed)
            results[component] = replace(quantize_graph(
                graph, staging / graph_filename(spec, precision, models.cut), component, encoding.precision, feeds,
                keep, encoding.unsigned_activations), precision=precision)
            log(f"  {component}: {results[component].quantized_nodes} nodes quantized to {precision}, kept in float: "
                + ", ".join(f"{g} {len(n)}" for g, n in results[component].kept.items())
                + f" ({time.perf_counter() - start:.1f} s)")
        decoder = SPECS["vae_decoder"].module(models) if models.vae is not None else None
        report = measure(graphs_run({c: r.path for c, r in results.items()}), models.unet, calibration,
                         encoding.gate, decoder=decoder, seed=seed)
        log(f"  {report.summary()}")
        report.check()
        out.mkdir(parents=True, exist_ok=True)
        for component, result in results.items():
            final = out / result.path.name
            os.replace(result.path, final)
            results[component] = replace(result, path=final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m calib.quantize",
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


def keep_groups(text: str) -> list[str]:
    groups = [] if text == "none" else [g for g in text.split(",") if g]
    bad = sorted(set(groups) - set(KEEP_GROUPS))
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(KEEP_GROUPS)} or none")
    return groups


def quantize_command(argv: list[str] | None = None) -> int:
    from export.checkpoint import load_unet, load_vae
    from export.onnx.components import Models

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
