"""ONNX Runtime (CPU) against the fp32 eager model: per-output errors and a pass/fail verdict.

Errors are measured against the fp32 eager component for every dtype, so the numbers say what a
user loses by running that graph. ``rel_l2 = ||onnx - ref|| / ||ref||`` is the gate; ``max_abs``
is gated too, scaled by the reference's largest magnitude (``max_abs <= tol * max(1, max|ref|)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.metrics import difference

from .components import Component, Models
from .exporter import example_inputs, input_dtypes, typed_module
from ..models.precision import DEFAULT_POLICY


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


def _passes(errors: dict[str, float], tol: Tolerance) -> bool:
    return (
        errors["finite"]
        and errors["rel_l2"] <= tol.rel_l2
        and errors["max_abs"] <= tol.max_abs * max(1.0, errors["ref_max_abs"])
    )


class _OnnxRuntimeCannotRun(RuntimeError):
    pass


def _compare(component: Component, models: Models, dtype: str, sizes, run) -> tuple[list[dict], bool]:
    """Errors of ``run(output_names, typed_inputs)`` against fp32 eager at each size."""
    tol = TOLERANCES[dtype]
    reference = component.module(models)
    policy, fp32 = DEFAULT_POLICY[dtype], DEFAULT_POLICY["fp32"]
    checks, passed = [], True
    for index, size in enumerate(sizes or component.check_sizes):
        inputs = example_inputs(component, models, fp32, size, seed=100 + index)
        with torch.no_grad():
            expected = reference(*inputs)
        expected = (expected,) if isinstance(expected, torch.Tensor) else expected
        typed = tuple(x.to(d) for x, d in zip(inputs, input_dtypes(component, policy)))
        got = run(list(component.outputs), typed)
        outputs = {}
        for name, value, ref in zip(component.outputs, got, expected):
            errors = asdict(difference(np.asarray(value, dtype=np.float32), ref.float()))
            errors["passed"] = _passes(errors, tol)
            passed &= errors["passed"]
            outputs[name] = errors
        checks.append({"batch": size[0], "height": size[1], "width": size[2], "outputs": outputs})
    return checks, passed


def _not_run(report: dict, component: Component, models: Models, dtype: str, sizes, reason: str) -> dict:
    """Say why ONNX Runtime could not check the graph, and give PyTorch's numbers for the same casts."""
    report["status"] = "not_run"
    report["reason"] = f"ONNX Runtime CPU {reason.splitlines()[0]}"
    module = typed_module(component, models, DEFAULT_POLICY[dtype])

    @torch.no_grad()
    def run_eager(names: list[str], typed: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        out = module(*typed)
        out = (out,) if isinstance(out, torch.Tensor) else out
        return [y.float().numpy() for y in out]

    checks, _ = _compare(component, models, dtype, sizes, run_eager)
    report["eager_same_casts"] = {
        "note": "PyTorch eager CPU with the graph's casts, not the ONNX graph; for information only",
        "checks": checks,
    }
    return report


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
        reason = str(exc).replace(onnx_path, Path(onnx_path).name)
        return _not_run(report, component, models, dtype, sizes, f"cannot load this {dtype} graph: {reason}")

    def run_onnx(names: list[str], typed: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        try:
            return session.run(names, {n: _feed(x) for n, x in zip(component.inputs, typed)})
        except Exception as exc:
            raise _OnnxRuntimeCannotRun(str(exc)) from exc

    try:
        report["checks"], passed = _compare(component, models, dtype, sizes, run_onnx)
    except _OnnxRuntimeCannotRun as exc:
        return _not_run(report, component, models, dtype, sizes, f"cannot run this {dtype} graph: {exc}")
    report["status"] = "passed" if passed else "failed"
    return report
