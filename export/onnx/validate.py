"""ONNX Runtime (CPU) against the fp32 eager model: per-output errors and a pass/fail verdict.

Errors are measured against the fp32 eager component for every dtype, so the numbers say what a
user loses by running that graph. ``rel_l2 = ||onnx - ref|| / ||ref||`` is the gate; ``max_abs``
is gated too, scaled by the reference's largest magnitude (``max_abs <= tol * max(1, max|ref|)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .components import Component, Models
from .exporter import example_inputs
from .precision import DEFAULT_POLICY


@dataclass(frozen=True)
class Tolerance:
    rel_l2: float
    max_abs: float


# Chosen from measurements of the full-size and small models (ONNX issue note), with headroom.
TOLERANCES = {
    "fp32": Tolerance(rel_l2=1e-4, max_abs=1e-4),
    "fp16": Tolerance(rel_l2=1e-2, max_abs=5e-2),
    "bf16": Tolerance(rel_l2=5e-2, max_abs=2.5e-1),
}


def _feed(value: torch.Tensor) -> np.ndarray:
    if value.dtype == torch.bfloat16:
        import ml_dtypes

        return value.float().numpy().astype(ml_dtypes.bfloat16)
    return value.numpy()


def output_errors(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    got64, ref64 = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    diff = got64 - ref64
    return {
        "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(ref64), 1e-30)),
        "ref_max_abs": float(np.abs(ref64).max()) if ref64.size else 0.0,
        "finite": bool(np.isfinite(got64).all()),
    }


def _passes(errors: dict[str, float], tol: Tolerance) -> bool:
    return (
        errors["finite"]
        and errors["rel_l2"] <= tol.rel_l2
        and errors["max_abs"] <= tol.max_abs * max(1.0, errors["ref_max_abs"])
    )


def validate_graph(
    component: Component,
    models: Models,
    onnx_path: str,
    dtype: str,
    sizes: tuple[tuple[int, int, int], ...] | None = None,
) -> dict:
    """Run the graph in ONNX Runtime on CPU at ``sizes`` and compare with fp32 eager.

    Returns a JSON-ready report. ``status`` is ``passed``, ``failed`` or ``not_run`` (with the
    reason, e.g. bf16 kernels that ONNX Runtime's CPU provider does not have).
    """
    import onnxruntime as ort

    tol = TOLERANCES[dtype]
    report = {
        "component": component.name,
        "dtype": dtype,
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "reference": "fp32 eager PyTorch",
        "tolerance": {"rel_l2": tol.rel_l2, "max_abs": f"{tol.max_abs} * max(1, max|ref|)"},
        "checks": [],
    }
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/NotImplemented types
        report["status"] = "not_run"
        report["reason"] = f"ONNX Runtime CPU cannot load this {dtype} graph: {str(exc).splitlines()[0]}"
        return report

    reference = component.module(models)
    policy = DEFAULT_POLICY[dtype]
    fp32 = DEFAULT_POLICY["fp32"]
    passed = True
    for index, size in enumerate(sizes or component.check_sizes):
        inputs = example_inputs(component, models, fp32, size, seed=100 + index)
        with torch.no_grad():
            expected = reference(*inputs)
        expected = (expected,) if isinstance(expected, torch.Tensor) else expected
        typed = example_inputs(component, models, policy, size, seed=100 + index)
        feed = {name: _feed(x) for name, x in zip(component.inputs, typed)}
        try:
            got = session.run(list(component.outputs), feed)
        except Exception as exc:
            report["status"] = "not_run"
            report["reason"] = f"ONNX Runtime CPU cannot run this {dtype} graph: {str(exc).splitlines()[0]}"
            return report
        outputs = {}
        for name, value, ref in zip(component.outputs, got, expected):
            errors = output_errors(np.asarray(value, dtype=np.float32), ref.float().numpy())
            errors["passed"] = _passes(errors, tol)
            passed &= errors["passed"]
            outputs[name] = errors
        report["checks"].append({"batch": size[0], "height": size[1], "width": size[2], "outputs": outputs})
    report["status"] = "passed" if passed else "failed"
    return report
