"""What this CPU's matrix units can do, detected (not guessed): what ``auto`` chooses on the CPU by.

bf16 convolutions run on matrix units where the CPU has them: AMX tiles (Intel Sapphire Rapids and
later) or AVX-512 BF16 dot products (Intel Cooper Lake, AMD Zen 4 and later). There torch's oneDNN
convolutions in bf16, channels-last, run at about twice (AVX-512 BF16) to several times (AMX) the
fp32 rate (``benchmarks/results/cpu_latency.md``); without them bf16 is converted to fp32 and is
no faster. oneDNN can be held below an instruction set (``ONEDNN_MAX_CPU_ISA``); a cap under its
bf16 level counts as no bf16 units.

int8 dot products (AVX-512 VNNI, AVX-VNNI, AMX-INT8) run ONNX Runtime's CPU integer kernels (MLAS)
on the folder's CPU graphs (``export.pipeline.cpu_graphs``): uint8 activations times int8 weights,
summed in int32 without overflow. Without them MLAS multiplies in 16-bit pairs that can saturate,
so ``auto`` takes those graphs only where the CPU has them (oneDNN's cap does not apply: ONNX
Runtime does not use oneDNN).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

# oneDNN's ISA names from which it uses bf16 dot products (AVX-512 BF16) and AMX tiles; a cap
# (ONEDNN_MAX_CPU_ISA, older DNNL_MAX_CPU_ISA) below both keeps bf16 convolutions off the units.
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
                     "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                     "AVX10_2_512_AMX_2", "ALL", "DEFAULT")
_ONEDNN_AMX_ISAS = ("AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16",
                    "AVX10_2_512_AMX_2", "ALL", "DEFAULT")


@dataclass(frozen=True)
class CpuMatrixUnits:
    """The bf16 matrix units oneDNN can use here."""

    amx_bf16: bool
    avx512_bf16: bool
    isa_cap: str | None = None  # ONEDNN_MAX_CPU_ISA as set, when set
    int8_dot: bool = False  # VNNI or AMX-INT8: ONNX Runtime's CPU int8 kernels run exact and fast

    @property
    def bf16(self) -> bool:
        """Whether bf16 convolutions run on matrix units here (faster than fp32)."""
        return self.amx_bf16 or self.avx512_bf16

    def describe(self) -> str:
        units = [name for name, present in (("AMX", self.amx_bf16), ("AVX-512 BF16", self.avx512_bf16)) if present]
        text = " and ".join(units) if units else "no bf16 matrix units (neither AMX nor AVX-512 BF16)"
        text += f", oneDNN capped at {self.isa_cap}" if self.isa_cap else ""
        return text + ("; int8 dot products (VNNI/AMX-INT8)" if self.int8_dot else "; no int8 dot products (VNNI)")


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _detected(name: str, flag: str) -> bool:
    """torch's own check (its cpuinfo library: the CPU and the OS's support), else the kernel's flag."""
    check = getattr(torch.cpu, name, None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:
            pass
    return flag in _cpuinfo_flags()


@functools.cache
def cpu_matrix_units() -> CpuMatrixUnits:
    """This CPU's bf16 matrix units as oneDNN will use them, and its int8 dot products (detected once
    per process)."""
    amx = _detected("_is_amx_tile_supported", "amx_bf16")
    avx512_bf16 = _detected("_is_avx512_bf16_supported", "avx512_bf16")
    int8_dot = _detected("_is_vnni_supported", "avx512_vnni") or bool({"avx_vnni", "amx_int8"} & _cpuinfo_flags())
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if cap:
        normalised = cap.strip().upper()
        amx = amx and normalised in _ONEDNN_AMX_ISAS
        avx512_bf16 = avx512_bf16 and normalised in _ONEDNN_BF16_ISAS
    return CpuMatrixUnits(amx_bf16=amx, avx512_bf16=avx512_bf16, isa_cap=cap or None, int8_dot=int8_dot)
