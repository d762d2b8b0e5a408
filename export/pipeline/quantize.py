"""The quantize stage: INT8/FP8 graphs of both pass components, calibrated and gated together.

``quantize_components`` exports the float part, quantizes it with calib and gates the pass (the
build's stages and ``python -m export.quantize`` use it); calib gets the models' encoder and the
eager reference from here as arguments.

Reused (gate result included) when the weights, calibration set, precision, kept layer groups,
gate seed and the source of every project module this stage imports are unchanged.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from calib.accuracy import AccuracyGateError, AccuracyReport, graphs_run, measure
from calib.data import CalibrationSet
from calib.quantize import (
    DEFAULT_KEEP,
    ENCODINGS,
    Encode,
    QuantizationError,
    QuantizeResult,
    calibration_inputs,
    quantize_graph,
)
from engines.manifest import content_key, sha256_file
from export.onnx.components import COMPONENTS, Models
from export.onnx.exporter import export_component, graph_filename
from export.reference import pass_reference
from runtime.upscale_pass import PASS_COMPONENTS

from .errors import BuildError
from .folder import ONNX_DIR, ArtifactFolder
from .gate import GATED_GRAPHS
from .graph import GraphArtifact, toolkit_facts
from .progress import StageLog
from .weights import public_config


def eager_encode(models: Models) -> Encode:
    """The eager conditioning encoder with its outputs named as the U-Net graph's inputs."""
    spec = COMPONENTS["cond_encoder"]
    module = spec.module(models)
    return lambda latents_small, timestep: dict(zip(spec.outputs, module(latents_small, timestep)))


def quantize_components(
    models: Models,
    precision: str,
    calibration: CalibrationSet,
    out: Path,
    keep: Iterable[str] = DEFAULT_KEEP,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, QuantizeResult], AccuracyReport]:
    """Export both pass components (the encoding's float part), quantize them, gate the pass, and
    only then write them. ``precision``: an ``ENCODINGS`` name (int8 and fp8 for TensorRT, cpu-int8
    for ONNX Runtime's CPU provider).

    The graphs are staged beside ``out``; if the gate fails they are deleted and
    ``AccuracyGateError`` carries the numbers, so ``out`` never holds a graph that failed.
    """
    if precision not in ENCODINGS:
        raise QuantizationError(f"precision must be one of {', '.join(ENCODINGS)}, got {precision!r}")
    encoding = ENCODINGS[precision]
    staging = out / ".staging-quantize"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    results = {}
    encode = eager_encode(models)
    try:
        for component in PASS_COMPONENTS:
            spec = COMPONENTS[component]
            start = time.perf_counter()
            float_part = encoding.float_part
            graph = export_component(spec, models, float_part, staging / graph_filename(spec, float_part, models.cut)).path
            feeds = calibration_inputs(component, encode, calibration, seed)
            results[component] = replace(quantize_graph(
                graph, staging / graph_filename(spec, precision, models.cut), component, encoding.precision, feeds,
                keep, encoding.unsigned_activations), precision=precision)
            log(f"  {component}: {results[component].quantized_nodes} nodes quantized to {precision}, kept in float: "
                + ", ".join(f"{g} {len(n)}" for g, n in results[component].kept.items())
                + f" ({time.perf_counter() - start:.1f} s)")
        decoder = COMPONENTS["vae_decoder"].module(models) if models.vae is not None else None
        report = measure(graphs_run({c: r.path for c, r in results.items()}), pass_reference(models.unet), calibration,
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


@dataclass(frozen=True)
class QuantizedGraphs:
    graphs: dict[str, GraphArtifact]  # by pass component
    accuracy: dict  # the gate's report on the quantized pass


class QuantizeGraphs:
    """Quantize stage. In: the models, precision, calibration set, layer groups kept in float and
    the gate's seed. Out: both pass components' graphs and their gate report. Key: those inputs,
    the U-Net's config and digest, and ``toolkit_facts`` of this module."""

    def __init__(self, models: Models, precision: str, calibration: CalibrationSet, keep: tuple[str, ...],
                 seed: int, unet_sha256: str, folder: ArtifactFolder, progress: StageLog):
        self.models, self.precision, self.calibration, self.keep, self.seed = models, precision, calibration, keep, seed
        self.unet_sha256, self.folder, self.progress = unet_sha256, folder, progress

    def key(self) -> str:
        return content_key("quantized", self.precision, self.models.cut, public_config(self.models.unet),
                           self.unet_sha256, toolkit_facts(__name__), self.calibration.digest(), sorted(self.keep),
                           self.seed)

    def __call__(self) -> QuantizedGraphs:
        precision, calibration, key = self.precision, self.calibration, self.key()
        start = time.perf_counter()
        self.progress(f"cond_encoder + unet ({precision}): calibrating on {len(calibration.samples)} sample(s), "
                      f"{calibration.source}")
        subfolder = f"{ONNX_DIR}/{key}"
        files = {c: f"{subfolder}/{graph_filename(COMPONENTS[c], precision, self.models.cut)}" for c in PASS_COMPONENTS}
        previous = [self.folder.previous.get(c) for c in PASS_COMPONENTS]
        if all(p and p.onnx_key == key and p.onnx_file == files[c] and self.folder.reusable(files[c], p.onnx_sha256)
               for c, p in zip(PASS_COMPONENTS, previous)):
            graphs = {c: GraphArtifact(files[c], p.onnx_sha256, key, p.validation) for c, p in zip(PASS_COMPONENTS, previous)}
            self.progress.finished("cond_encoder+unet", "quantize", start, reused=True)
            return QuantizedGraphs(graphs, previous[1].validation.get("accuracy"))
        try:
            results, report = quantize_components(self.models, precision, calibration, self.folder.out / subfolder,
                                                  self.keep, self.seed, log=self.progress)
        except AccuracyGateError as exc:
            raise BuildError(f"the {precision} graphs failed the accuracy gate, nothing was written: {exc} "
                             "Calibrate on real latents (--calib), keep more layers in float (--keep), or "
                             "build fp16.") from exc
        except QuantizationError as exc:
            raise BuildError(str(exc)) from exc
        accuracy = {"gated": GATED_GRAPHS, "calibration": calibration.describe(), **report.to_dict()}
        validation = {"status": "passed", "gate": "pass accuracy against fp32 eager", "accuracy": accuracy}
        graphs = {
            component: GraphArtifact(files[component], sha256_file(self.folder.out / files[component]), key,
                                     dict(validation, quantization=result.to_dict()))
            for component, result in results.items()
        }
        self.progress.finished("cond_encoder+unet", "quantize", start, reused=False, accuracy=report.worst)
        return QuantizedGraphs(graphs, accuracy)
