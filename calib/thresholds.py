"""The accuracy gate's limits per precision, in a module of their own: the build's check-set stage
stores them in the artifact folder, and importing them must not bring in the gate (and through it
the runtime's backends), whose edits would otherwise invalidate that stage's reuse key."""

from __future__ import annotations

from dataclasses import dataclass

from engines.manifest import CPU_INT8


@dataclass(frozen=True)
class Thresholds:
    rel_l2: float
    max_abs: float
    psnr_db: float


# Worst sample over the calibration set, output latent of one pass. Measured on the CPU (ONNX Runtime,
# random weights, seeded-noise calibration; calib/README.md, "Calibration sets"): fp16 full size rel-L2 2.7e-4;
# int8 0.023 full size, 0.026 small (40 dB decoded, small VAE); fp8 0.069 / 0.091 (28 dB). Limits
# leave about 2x headroom over int8/fp8, more over fp16; bf16 is unmeasured on the CPU.
THRESHOLDS = {
    "fp32": Thresholds(rel_l2=1e-4, max_abs=1e-3, psnr_db=80.0),
    "fp16": Thresholds(rel_l2=5e-3, max_abs=5e-2, psnr_db=45.0),
    "bf16": Thresholds(rel_l2=3e-2, max_abs=2.5e-1, psnr_db=35.0),
    "int8": Thresholds(rel_l2=0.06, max_abs=0.5, psnr_db=32.0),
    "fp8": Thresholds(rel_l2=0.15, max_abs=1.0, psnr_db=24.0),
}

# The CPU graphs (CPU_INT8, calib.quantize.ENCODINGS) replace the torch bf16 path where the CPU runs
# them, so their pass is held to bf16's limits.
GATE_OF = {CPU_INT8: "bf16"}
