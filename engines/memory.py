"""Device-memory estimate of an ONNX graph at given input shapes, without TensorRT.

TensorRT reports the real figure only after a build; profiles must be sized before one. The
estimate is the peak of simultaneously live activations when the graph's nodes run in order
(each tensor freed after its last use), plus the weights. TensorRT fuses elementwise ops into
their producers and reuses buffers, so it usually needs less activation memory than this, but
tactics may add workspace; treat it as a planning figure, and the engine's own number (recorded
in the manifest after a build) as the truth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import FlowUpscalerError
from .requirements import ONNXRUNTIME_EXTRAS

# ONNX Runtime 1.30's symbolic inference ignores Shape's start/end (opset 15+), so the sizes that
# opset-18 Resize computes from a sliced Shape come out at the wrong rank; fixed in 1.31.0
# (measured: 1.30.0 fails the exported U-Net's estimate, 1.31.0, 1.31.1 and 1.32.0 pass).
MIN_ONNXRUNTIME = (1, 31)
_SMALL_INITIALIZER = 64  # elements; larger ones (weights) only need their shapes for inference


class MemoryEstimateError(FlowUpscalerError, RuntimeError):
    """The graph's shapes could not be inferred at the given input shapes (or ONNX Runtime, which
    infers them, is missing or too old)."""


def _min_version() -> str:
    return ".".join(map(str, MIN_ONNXRUNTIME))


def _symbolic_shape_inference():
    """ONNX Runtime's ``SymbolicShapeInference``, imported on first use so that this module (and
    the build that imports it) loads without ONNX Runtime and says what to install."""
    try:
        import onnxruntime
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing == "onnxruntime":
            raise MemoryEstimateError(
                f"the memory estimate needs ONNX Runtime >= {_min_version()} (its symbolic shape "
                f"inference), and onnxruntime is not installed: {ONNXRUNTIME_EXTRAS}"
            ) from exc
        if missing == "sympy":
            raise MemoryEstimateError(
                "ONNX Runtime's symbolic shape inference needs sympy (its 'symbolic' extra, which the "
                "project's cpu and gpu extras request): pip install sympy"
            ) from exc
        raise
    release = tuple(int(part) for part in re.findall(r"\d+", onnxruntime.__version__)[:2])
    if release < MIN_ONNXRUNTIME:
        raise MemoryEstimateError(
            f"the memory estimate needs onnxruntime >= {_min_version()}, this is "
            f"{onnxruntime.__version__} (older releases mis-size opset-18 Resize): upgrade the "
            "installed one, pip install -U onnxruntime (or onnxruntime-gpu, whichever is installed)"
        )
    return SymbolicShapeInference


@dataclass(frozen=True)
class MemoryEstimate:
    activations: int
    weights: int

    @property
    def total(self) -> int:
        return self.activations + self.weights


def _itemsize(elem_type: int) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def _shape_only_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy whose large initializers are typed graph inputs: inference needs their shapes only."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    graph = stripped.graph
    keep, weights = [], 0
    for init in graph.initializer:
        count = int(np.prod(init.dims, dtype=np.int64))
        weights += count * _itemsize(init.data_type)
        if count <= _SMALL_INITIALIZER:
            keep.append(init)
        else:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return stripped, weights


class GraphMemoryModel:
    """Loads a graph once and estimates its memory at any set of concrete input shapes."""

    def __init__(self, model: onnx.ModelProto | str | Path):
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        self._model, self.weights = _shape_only_model(model)
        self._initializers = {i.name for i in model.graph.initializer}

    def estimate(self, input_shapes: dict[str, tuple[int, ...]]) -> MemoryEstimate:
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        graph = model.graph
        for value in graph.input:
            if value.name in input_shapes:
                dims = value.type.tensor_type.shape.dim
                shape = input_shapes[value.name]
                if len(dims) != len(shape):
                    raise ValueError(f"input {value.name!r} has rank {len(dims)}, got shape {shape}")
                for dim, size in zip(dims, shape):
                    dim.Clear()
                    dim.dim_value = int(size)
        missing = {v.name for v in graph.input} - set(input_shapes) - self._initializers
        if missing:
            raise ValueError(f"no shape given for graph input(s) {sorted(missing)}")
        del graph.value_info[:]
        for output in graph.output:
            output.type.tensor_type.ClearField("shape")
        # ONNX's own inference cannot size Resize outputs whose sizes are computed from Shape ops;
        # ONNX Runtime's symbolic inference propagates those values.
        shape_inference = _symbolic_shape_inference()
        try:
            inferred = shape_inference.infer_shapes(model, auto_merge=False).graph
        except Exception as exc:  # its asserts and index errors carry no message of their own
            import onnxruntime

            raise MemoryEstimateError(
                f"ONNX Runtime {onnxruntime.__version__} could not infer the graph's shapes at {input_shapes} "
                f"({type(exc).__name__}: {exc})"
            ) from exc

        sizes: dict[str, int] = {}
        for value in [*inferred.input, *inferred.value_info, *inferred.output]:
            if value.name in self._initializers:
                continue
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            if None in dims:
                raise ValueError(f"shape of {value.name!r} is not known at {input_shapes}")
            sizes[value.name] = int(np.prod(dims, dtype=np.int64)) * _itemsize(tensor.elem_type)
        return MemoryEstimate(activations=_peak_live_bytes(inferred, sizes), weights=self.weights)


def _peak_live_bytes(graph: onnx.GraphProto, sizes: dict[str, int]) -> int:
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = index
    outputs = {o.name for o in graph.output}
    live = {i.name for i in graph.input if i.name in sizes}
    current = sum(sizes[n] for n in live)
    peak = current
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name in sizes and name not in live:
                live.add(name)
                current += sizes[name]
        peak = max(peak, current)
        for name in set(node.input):
            if name in live and last_use.get(name) == index and name not in outputs:
                live.discard(name)
                current -= sizes[name]
    return peak
