"""Tests that pin ``auto``'s CPU path whatever CPU runs them: the detected bf16 units replaced."""

from __future__ import annotations

import pytest

import runtime.selection as selection
from runtime.cpu import CpuMatrixUnits

WITH_BF16 = CpuMatrixUnits(amx_bf16=False, avx512_bf16=True)
WITHOUT_BF16 = CpuMatrixUnits(amx_bf16=False, avx512_bf16=False)


def pretend_cpu(monkeypatch: pytest.MonkeyPatch, units: CpuMatrixUnits) -> None:
    """``auto`` on the CPU decides as it would on a CPU with ``units``."""
    monkeypatch.setattr(selection, "cpu_matrix_units", lambda: units)
