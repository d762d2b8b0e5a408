"""The gate stage: one upscaling pass through what will be published, against the fp32 eager model.

The engines are gated where they were built (the runtime's TensorRT backend), else the float graphs
on ONNX Runtime's CPU provider; quantized graphs were gated by the quantize stage before they were
written. Not reused: a float gate runs on every build, an engine gate whenever engines are published.
"""

from __future__ import annotations

import time

import torch

from calib.accuracy import graphs_run, measure
from engines.manifest import ComponentRecord
from export.onnx.components import COMPONENTS, Models
from export.reference import pass_reference
from runtime.upscale_pass import PASS_COMPONENTS

from .engine import EngineHost
from .errors import BuildError
from .folder import ArtifactFolder
from .profiles import PIXELS_PER_LATENT, latent_ranges
from .progress import StageLog
from .settings import BuildSettings

CPU_GATE_PRECISIONS = ("fp32", "fp16")  # what ONNX Runtime's CPU provider runs
GATED_GRAPHS = "onnx graphs on onnxruntime (cpu)"
GATED_ENGINES = "engines (the runtime's tensorrt backend)"


def check_calibration_fits_engines(settings: BuildSettings) -> None:
    """Engines are gated at the calibration samples' sizes, so those must lie inside the range the
    engines will be built for: checked before any engine is built."""
    if not set(PASS_COMPONENTS) <= set(settings.components):
        return
    lo, hi, _ = latent_ranges(settings.target)["cond_encoder"]
    for sample in settings.calibration_set().samples:
        h, w = sample.shape[2:]
        if not (lo <= min(h, w) and max(h, w) <= hi):
            raise BuildError(
                f"a calibration sample of {h}x{w} latent pixels is outside the engines' input range "
                f"{lo}..{hi} ({lo * PIXELS_PER_LATENT}..{hi * PIXELS_PER_LATENT} px): the engines are gated on "
                "these samples. Use latents inside the range (--calib) or --calib-side"
            )


class GatePass:
    """Gate stage. In: the component records about to be published and the quantize stage's gate
    report (None for float builds). Out: the accuracy report for ``report.json`` (None when the
    pass components are not built). Raises ``BuildError``, after deleting what this build wrote,
    when the engines fail."""

    def __init__(self, models: Models, settings: BuildSettings, host: EngineHost, folder: ArtifactFolder,
                 progress: StageLog):
        self.models, self.settings, self.host, self.folder, self.progress = models, settings, host, folder, progress

    def __call__(self, records: dict[str, ComponentRecord], graphs_accuracy: dict | None) -> dict | None:
        if not set(PASS_COMPONENTS) <= set(records):
            return graphs_accuracy
        built = all(records[c].engine.built for c in PASS_COMPONENTS)
        if built and self.host.runs_engines_for(self.settings.target):
            return self._gate_engines(records, graphs_accuracy)
        # Engines built ahead of time (TensorRT-RTX without the target GPU) are checked on the
        # target at first load, by the check set; here the graphs they were built from are gated.
        if graphs_accuracy is not None:
            return graphs_accuracy
        precision = self.settings.precision
        if precision not in CPU_GATE_PRECISIONS:
            return {"status": "not_run", "reason": f"ONNX Runtime's CPU provider cannot run {precision} graphs"}
        start = time.perf_counter()
        calibration = self.settings.calibration_set()
        run = graphs_run({c: self.folder.out / records[c].onnx_file for c in PASS_COMPONENTS})
        report = measure(run, pass_reference(self.models.unet), calibration, precision, decoder=self._decoder(), seed=self.settings.seed)
        self.progress(f"accuracy of one pass ({precision} graphs vs fp32 eager): {report.summary()}")
        self.progress.finished("cond_encoder+unet", "accuracy", start, reused=False, accuracy=report.worst)
        return {"gated": GATED_GRAPHS, "calibration": calibration.describe(), **report.to_dict()}

    def _decoder(self):
        return COMPONENTS["vae_decoder"].module(self.models) if self.models.vae is not None else None

    def _gate_engines(self, records: dict[str, ComponentRecord], graphs_accuracy: dict | None) -> dict:
        """Run the calibration pass through the engines; on any failure delete what this build
        wrote that the previous manifest does not name."""
        from runtime.backends import BackendUnavailable
        from runtime.backends.tensorrt import TensorRTBackend

        precision, calibration = self.settings.precision, self.settings.calibration_set()
        start = time.perf_counter()
        engines = {c: (self.folder.out / records[c].engine.file, records[c].profiles) for c in PASS_COMPONENTS}
        try:
            backend = TensorRTBackend(engines, torch.device("cuda", 0), flavour=self.host.flavour.name)
            try:
                report = measure(backend.run, pass_reference(self.models.unet), calibration, precision, decoder=self._decoder(),
                                 seed=self.settings.seed, device=backend.device)
            finally:
                backend.close()
        except (BackendUnavailable, RuntimeError, ValueError, TypeError) as exc:
            removed = self.folder.discard_new(records)
            raise BuildError(f"the {precision} TensorRT engines could not be gated ({exc}); {removed}") from exc
        self.progress(f"accuracy of one pass ({precision} TensorRT engines vs fp32 eager): {report.summary()}")
        accuracy = {"gated": GATED_ENGINES, "calibration": calibration.describe(), **report.to_dict()}
        if graphs_accuracy and "passed" in graphs_accuracy:
            accuracy["graphs"] = graphs_accuracy
        self.progress.finished("cond_encoder+unet", "engine accuracy", start, reused=False, accuracy=report.worst)
        if not report.passed:
            removed = self.folder.discard_new(records)
            raise BuildError(
                f"the {precision} TensorRT engines failed the accuracy gate: {report.summary()}. {removed} "
                "Build another precision, or keep more layers in float (--keep)."
            )
        return accuracy
