"""The quantize stage: INT8/FP8 graphs of both pass components, calibrated and gated together.

Reused (gate result included) when the weights, calibration set, precision, kept layer groups,
gate seed and the source of every project module this stage imports are unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from calib.accuracy import AccuracyGateError
from calib.data import CalibrationSet
from calib.quantize import QuantizationError, quantize_components
from engines.manifest import content_key, sha256_file
from export.onnx.components import COMPONENTS, Models
from export.onnx.exporter import graph_filename
from runtime.upscale_pass import PASS_COMPONENTS

from .errors import BuildError
from .folder import ONNX_DIR, ArtifactFolder
from .gate import GATED_GRAPHS
from .graph import GraphArtifact, toolkit_facts
from .progress import StageLog
from .weights import public_config


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
