"""The error figures every comparison in the project reports, defined once.

The check set (runtime.checkset), the ONNX validation (export.onnx.validate), the accuracy gate
(calib.accuracy) and the benchmarks hold outputs to limits stated in these terms, so they must
mean the same thing everywhere: relative L2 and max-abs in float64, a zero reference guarded (a
zero output against a zero reference is 0, not NaN), and one percentile rule for latencies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The reference norm a relative L2 divides by at least: an all-zero reference gives 0 for an
# all-zero output and a huge figure for anything else, never NaN or a division error.
_TINY_NORM = 1e-30


@dataclass(frozen=True)
class Difference:
    """How far ``got`` is from ``expected``: relative L2, max-abs, the reference's max-abs (for
    limits scaled by it), and whether ``got`` is finite everywhere."""

    rel_l2: float
    max_abs: float
    ref_max_abs: float
    finite: bool


def _float64(values: object) -> np.ndarray:
    """A torch tensor (any device, any float dtype) or array-like as a float64 numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def difference(got: object, expected: object) -> Difference:
    """The figures of ``got`` against ``expected`` (same shape; torch tensors or numpy arrays)."""
    got64, expected64 = _float64(got), _float64(expected)
    if got64.shape != expected64.shape:
        raise ValueError(f"cannot compare shape {got64.shape} with {expected64.shape}")
    diff = got64 - expected64
    return Difference(
        rel_l2=float(np.linalg.norm(diff.ravel()) / max(float(np.linalg.norm(expected64.ravel())), _TINY_NORM)),
        max_abs=float(np.abs(diff).max()) if diff.size else 0.0,
        ref_max_abs=float(np.abs(expected64).max()) if expected64.size else 0.0,
        finite=bool(np.isfinite(got64).all()),
    )


def relative_l2(got: object, expected: object) -> float:
    """||got - expected|| / ||expected|| in float64, with the zero-reference guard."""
    return difference(got, expected).rel_l2


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1: the smallest value with at least ``q`` of the values
    at or below it); None for no values."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile q must be within 0..1, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
