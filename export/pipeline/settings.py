"""What one build is asked for: target, precisions, components, options, weights and calibration."""

from __future__ import annotations

from dataclasses import dataclass, field

from calib.data import CalibrationSet, load_calibration_set
from calib.quantize import DEFAULT_KEEP
from engines.profiles import MAX_BATCH
from engines.targets import Target
from engines.tensorrt_build import BuildOptions

BUILD_COMPONENTS = ("cond_encoder", "unet", "vae_decoder")
CALIBRATION_SIZE = 4  # samples: the gate runs each through the fp32 eager model and the graphs


@dataclass
class BuildSettings:
    """Everything a build is asked for, so the stages need nothing from the command line."""

    target: Target
    precision: str
    vae_precision: str
    components: tuple[str, ...] = BUILD_COMPONENTS
    max_batch: int = MAX_BATCH
    options: BuildOptions = field(default_factory=BuildOptions)
    require_engines: bool = False
    rebuild_command: str = "python -m export.build"
    weights: dict = field(default_factory=dict)
    calibration: CalibrationSet | None = None  # None: the seeded fallback, made when first needed
    keep: tuple[str, ...] = DEFAULT_KEEP
    seed: int = 0  # of the accuracy gate's pass noise
    engine_flavour: str | None = None  # engines.flavours name; None: the target's default
    # int8 graphs for ONNX Runtime's CPU provider beside the target's (export.pipeline.cpu_graphs).
    # Off unless asked: the CLI asks whenever it builds both pass components (--no-cpu-int8).
    cpu_int8: bool = False

    def calibration_set(self) -> CalibrationSet:
        if self.calibration is None:
            self.calibration = load_calibration_set(size=CALIBRATION_SIZE)
        return self.calibration

    def precision_of(self, component: str) -> str:
        return self.vae_precision if component == "vae_decoder" else self.precision
