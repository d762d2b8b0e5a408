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
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from engines.errors import FlowUpscalerError
from engines.files import atomic_output
from engines.logs import quiet_logger
from runtime.noise import CpuNoise
from runtime.upscale_pass import timesteps

from .data import CalibrationSet
from .thresholds import CPU_INT8, GATE_OF

QUANTIZED_PRECISIONS = ("int8", "fp8")
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


# The eager conditioning encoder: (latents_small, timestep) -> its outputs by name (the U-Net's
# conditioning inputs). The build side makes it from the model, so calib needs nothing of export.
Encode = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def calibration_inputs(component: str, encode: Encode, calibration: CalibrationSet,
                       seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Each sample's fp32 inputs of ``component`` in one pass: the eager encoder feeds the U-Net."""
    feeds = []
    for index, latents in enumerate(calibration.samples):
        timestep = timesteps(latents.shape[0])
        if component == "cond_encoder":
            feeds.append({"latents_small": latents.numpy(), "timestep": timestep.numpy()})
            continue
        with torch.inference_mode():
            encoded = encode(latents, timestep)
        noise = CpuNoise(seed + index).next_pass(latents)
        feeds.append({"sample": noise.numpy(), **{n: t.float().numpy() for n, t in encoded.items()}})
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

def keep_groups(text: str) -> list[str]:
    groups = [] if text == "none" else [g for g in text.split(",") if g]
    bad = sorted(set(groups) - set(KEEP_GROUPS))
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(KEEP_GROUPS)} or none")
    return groups
