"""GPU target presets: what an engine is built for, and what the benchmarks compare against.

Peak throughput is the vendor's dense FP16/BF16 tensor-core figure with FP32 accumulation
(GeForce cards run FP32 accumulation at half their FP16-accumulate rate), in TFLOP/s.
The memory budget is the share of the card the upscaler's engines may plan for (weights plus the
largest activation set of one component): 75 % of the card, leaving room for the CUDA context
and the host application's own tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import FlowUpscalerError
from .flavours import TENSORRT, TENSORRT_RTX, get_flavour

BUDGET_SHARE = 0.75
GIB = 1 << 30
# tensor-core support by compute capability (fp8: Ada and Hopper onwards)
MIN_COMPUTE_CAPABILITY = {"fp16": (0, 0), "bf16": (8, 0), "int8": (0, 0), "fp8": (8, 9)}

# Resolution range every preset defaults to: 512 px images in, up to 8K px out, across chained
# 2x passes (512 -> 1024 -> 2048 -> 4096 -> 8192). Pixel sides; latents are 1/8.
DEFAULT_MIN_INPUT_PX = 512
DEFAULT_MAX_OUTPUT_PX = 8192


class TargetError(FlowUpscalerError, ValueError):
    """A target that does not exist or cannot be detected."""


@dataclass(frozen=True)
class Target:
    name: str
    gpu: str
    compute_capability: tuple[int, int]
    memory_gib: float
    peak_tflops: float | None
    default_precision: str = "fp16"
    min_input_px: int = DEFAULT_MIN_INPUT_PX
    max_output_px: int = DEFAULT_MAX_OUTPUT_PX
    # Engine flavours that serve this GPU, the default first (engines.flavours).
    engine_flavours: tuple[str, ...] = (TENSORRT.name,)

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_gib * BUDGET_SHARE * GIB)

    @property
    def precisions(self) -> tuple[str, ...]:
        """Precisions this GPU has tensor-core support for."""
        return tuple(p for p, needs in MIN_COMPUTE_CAPABILITY.items() if self.compute_capability >= needs)

    @property
    def vae_precision(self) -> str:
        """The FLUX VAE decoder overflows fp16 on some inputs; bf16 keeps fp32's range."""
        return "bf16" if "bf16" in self.precisions else "fp32"

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions and precision != "fp32":
            needs = MIN_COMPUTE_CAPABILITY.get(precision)
            why = f"{precision} needs compute capability >= {needs[0]}.{needs[1]}; " if needs else ""
            raise TargetError(
                f"{precision} is not supported on {self.gpu} (compute capability "
                f"{self.compute_capability[0]}.{self.compute_capability[1]}): {why}"
                f"supported: {', '.join(self.precisions)}"
            )

    def check_flavour(self, flavour: str) -> None:
        """Refuse a flavour that cannot build engines for this GPU, naming those that can."""
        get_flavour(flavour)
        if flavour not in self.engine_flavours:
            raise TargetError(
                f"{flavour} engines cannot target {self.gpu} (compute capability {self.compute_capability[0]}."
                f"{self.compute_capability[1]}): use {' or '.join(self.engine_flavours)}"
            )

    def with_range(self, min_input_px: int | None, max_output_px: int | None) -> Target:
        return replace(
            self,
            min_input_px=self.min_input_px if min_input_px is None else min_input_px,
            max_output_px=self.max_output_px if max_output_px is None else max_output_px,
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "gpu": self.gpu,
            "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
            "memory_gib": self.memory_gib,
            "memory_budget_bytes": self.memory_budget_bytes,
            "peak_tflops_fp16": self.peak_tflops,
            "precisions": list(self.precisions),
            "engine_flavours": list(self.engine_flavours),
            "resolution_px": {"min_input": self.min_input_px, "max_output": self.max_output_px},
        }


# RTX cards: TensorRT-RTX by default (built ahead of time anywhere), TensorRT 10/11 on request.
RTX_FLAVOURS = (TENSORRT_RTX.name, TENSORRT.name)

PRESETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("rtx5090", "NVIDIA GeForce RTX 5090", (12, 0), 32, 209.5, engine_flavours=RTX_FLAVOURS),
        Target("rtx4090", "NVIDIA GeForce RTX 4090", (8, 9), 24, 165.2, engine_flavours=RTX_FLAVOURS),
        Target("rtx3090", "NVIDIA GeForce RTX 3090", (8, 6), 24, 71.0, engine_flavours=RTX_FLAVOURS),
        Target("h100", "NVIDIA H100 SXM", (9, 0), 80, 989.4),
        Target("l40s", "NVIDIA L40S", (8, 9), 48, 362.0),
        Target("a100", "NVIDIA A100 SXM", (8, 0), 80, 312.0),
    )
}
AUTO = "auto"
TARGET_CHOICES = (*PRESETS, AUTO)

# Substrings of CUDA device names that identify a preset's GPU.
_NAME_KEYS = {"RTX 5090": "rtx5090", "RTX 4090": "rtx4090", "RTX 3090": "rtx3090", "H100": "h100",
              "L40S": "l40s", "A100": "a100"}


def target_for_device(name: str, capability: tuple[int, int], memory_bytes: int) -> Target:
    """The preset matching a detected GPU (with its real memory), or a generic target for it."""
    memory_gib = round(memory_bytes / GIB, 1)
    for key, preset in _NAME_KEYS.items():
        if key.lower() in name.lower():
            return replace(PRESETS[preset], gpu=name, compute_capability=capability, memory_gib=memory_gib)
    rtx = "RTX" in name and TENSORRT_RTX.targets(capability)
    return Target(AUTO, name, capability, memory_gib, peak_tflops=None,
                  engine_flavours=RTX_FLAVOURS if rtx else (TENSORRT.name,))


def detect_target(device: int = 0) -> Target:
    import torch

    if not torch.cuda.is_available():
        raise TargetError(
            "--target auto needs a CUDA GPU on this machine and none was found; "
            f"name the GPU you build for instead: {', '.join(PRESETS)}"
        )
    props = torch.cuda.get_device_properties(device)
    return target_for_device(props.name, (props.major, props.minor), props.total_memory)


def get_target(name: str) -> Target:
    if name == AUTO:
        return detect_target()
    try:
        return PRESETS[name]
    except KeyError:
        raise TargetError(f"unknown target {name!r}; presets: {', '.join(TARGET_CHOICES)}") from None
