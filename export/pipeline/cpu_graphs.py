"""The CPU-graph stage: int8 graphs of both pass components for ONNX Runtime's CPU provider.

The folder's own graphs are made for TensorRT (fp16/bf16, or symmetric int8 with an fp16 float
part), which ONNX Runtime's CPU provider runs in fp32 at best. This stage adds, beside them, the
``cpu-int8`` encoding (``calib.quantize.ENCODINGS``): uint8 activations, symmetric per-channel int8
weights and an fp32 float part, which the CPU provider fuses into its integer kernels (VNNI, AMX).
It is calibrated on the build's calibration set and the whole pass is gated against fp32 eager at
bf16's limits, since ``auto`` runs it in place of torch's bf16 path. A gate failure does not fail
the build: the manifest records why, and ``auto`` runs the next path.

Reused (a failure included) when the weights (the VAE's too: the gate's decoded PSNR), calibration
set, gate seed, ONNX Runtime's version, whether this machine has int8 dot
products (without them the gate measures ONNX Runtime's saturating 16-bit path) and the source of
every project module this stage imports are unchanged.
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

from calib.accuracy import AccuracyGateError
from calib.quantize import CPU_INT8, CPU_KEEP, ENCODINGS, QuantizationError
from engines.manifest import CpuGraphRecord, content_key, sha256_file
from export.onnx.components import COMPONENTS, Models
from export.onnx.exporter import graph_filename
from runtime.cpu import cpu_matrix_units
from runtime.upscale_pass import PASS_COMPONENTS

from .folder import ONNX_DIR, ArtifactFolder
from .graph import toolkit_facts
from .progress import StageLog
from .quantize import quantize_components
from .settings import BuildSettings
from .weights import public_config

GATED = "cpu-int8 graphs on onnxruntime (cpu), the whole pass against fp32 eager at bf16's limits"


def _onnxruntime_version() -> str | None:
    """The installed ONNX Runtime (CPU or GPU wheel), read without importing it."""
    for package in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return f"{package} {version(package)}"
        except PackageNotFoundError:
            continue
    return None


class QuantizeCpuGraphs:
    """CPU-graph stage. In: the models, the build's calibration set and gate seed (the groups kept in
    float are the CPU graphs' own, ``calib.quantize.CPU_KEEP``, not ``--keep``).
    Out: a ``CpuGraphRecord`` per pass component (made, or why not). Key: those inputs, the models'
    configs and digests, ONNX Runtime's version, this CPU's int8 dot products and ``toolkit_facts``
    of this module."""

    def __init__(self, models: Models, settings: BuildSettings, digests: dict[str, str], folder: ArtifactFolder,
                 progress: StageLog):
        self.models, self.settings, self.digests = models, settings, digests
        self.folder, self.progress = folder, progress

    def key(self) -> str:
        settings = self.settings
        vae = public_config(self.models.vae) if self.models.vae is not None else None
        return content_key(CPU_INT8, self.models.cut, public_config(self.models.unet), vae, sorted(self.digests.items()),
                           toolkit_facts(__name__), _onnxruntime_version(), cpu_matrix_units().int8_dot,
                           settings.calibration_set().digest(), settings.seed)

    def __call__(self) -> dict[str, CpuGraphRecord]:
        calibration, key, start = self.settings.calibration_set(), self.key(), time.perf_counter()
        subfolder = f"{ONNX_DIR}/{key}"
        files = {c: f"{subfolder}/{graph_filename(COMPONENTS[c], CPU_INT8, self.models.cut)}" for c in PASS_COMPONENTS}
        previous = {c: p.cpu_graph for c in PASS_COMPONENTS if (p := self.folder.previous.get(c)) and p.cpu_graph}
        if len(previous) == len(PASS_COMPONENTS) and all(p.key == key for p in previous.values()):
            if all(not p.built for p in previous.values()) or all(
                p.file == files[c] and self.folder.reusable(p.file, p.sha256) for c, p in previous.items()
            ):
                self.progress.finished("cond_encoder+unet", CPU_INT8, start, reused=True)
                return previous
        self.progress(f"cond_encoder + unet ({CPU_INT8}, for ONNX Runtime's CPU provider): calibrating on "
                      f"{len(calibration.samples)} sample(s), {calibration.source}")
        try:
            results, report = quantize_components(self.models, CPU_INT8, calibration, self.folder.out / subfolder,
                                                  CPU_KEEP, self.settings.seed, log=self.progress)
        except (AccuracyGateError, QuantizationError) as exc:
            reason = f"quantization failed: {exc}" if isinstance(exc, QuantizationError) else \
                f"they failed the accuracy gate: {exc}"
            if not cpu_matrix_units().int8_dot:
                reason += (" (gated on a CPU without int8 dot products, where ONNX Runtime's int8 kernels can saturate: "
                           "build on a CPU with VNNI or AMX, where the runtime would run them)")
            self.progress(f"  {CPU_INT8}: not made, {reason}; the folder's other graphs are unaffected, and on the "
                          "CPU the runtime's auto runs its next path")
            self.progress.finished("cond_encoder+unet", CPU_INT8, start, reused=False, built=False)
            return {c: CpuGraphRecord(key=key, precision=CPU_INT8, reason=reason) for c in PASS_COMPONENTS}
        accuracy = {"gated": GATED, "calibration": calibration.describe(), **report.to_dict()}
        records = {
            component: CpuGraphRecord(
                file=files[component], sha256=sha256_file(self.folder.out / files[component]), key=key,
                precision=CPU_INT8,
                validation={"status": "passed", "accuracy": accuracy, "quantization": result.to_dict(),
                            "encoding": vars(ENCODINGS[CPU_INT8]), "onnxruntime": _onnxruntime_version(),
                            "gate_cpu_int8_dot_products": cpu_matrix_units().int8_dot},
            )
            for component, result in results.items()
        }
        self.progress.finished("cond_encoder+unet", CPU_INT8, start, reused=False, accuracy=report.worst)
        return records
