"""Export one component to a cleaned, checked ONNX graph with dynamic batch and spatial axes.

Exporter: torch.export-based (``torch.onnx.export(dynamo=True)``), opset 18. Chosen by
measurement on the full-size U-Net body (see the ONNX issue's note): both exporters keep the axes
dynamic and parse in ONNX Runtime; the TorchScript exporter is deprecated in PyTorch >= 2.9 and
needs a clean-up pass to reach the node count dynamo gives directly. Opset 18 is inside the range
TensorRT 10 and 11's ONNX parser supports; GroupNorm is exported as InstanceNormalization +
affine, which TensorRT handles natively.
Clean-up: onnxslim (constant folding, dead-node and identity removal), then ``onnx.checker`` and
shape inference.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from engines.files import atomic_output
from engines.logs import quiet_logger
from .components import Component, Models
from ..models.precision import DEFAULT_POLICY, Policy, TypedGraph, apply_policy, typed_part

OPSET = 18


@dataclass
class ExportResult:
    component: str
    dtype: str
    path: Path
    export_seconds: float
    cleanup_seconds: float
    nodes_exported: int
    nodes_final: int


def graph_filename(component: Component, dtype: str, cut: str) -> str:
    name = f"{component.name}_{cut}" if component.name == "vae_decoder_tail" else component.name
    return f"{name}.{dtype}.onnx"


def input_dtypes(component: Component, policy: Policy) -> list[torch.dtype]:
    """The dtype each graph input has (what callers must feed)."""
    return [
        torch.float32 if n in component.fp32_inputs or n in component.exact_inputs else policy.torch_dtype
        for n in component.inputs
    ]


def typed_module(component: Component, models: Models, policy: Policy) -> TypedGraph:
    """The component as exported: cast per ``policy``, with fp32 boundaries where the spec says."""
    return typed_part(component, apply_policy(component.module(models), policy), policy.torch_dtype)


def example_inputs(
    component: Component, models: Models, policy: Policy, size: tuple[int, int, int], seed: int = 0
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    inputs = component.make_inputs(models, *size, generator)
    return tuple(x.to(d) for x, d in zip(inputs, input_dtypes(component, policy)))


def _name_output_axes(model: onnx.ModelProto, component: Component) -> None:
    # dynamo names output dims by the expression it derived (e.g. "4*((height-1)//4)+4");
    # where the relation is known, use the input's plain name instead.
    for output in model.graph.output:
        for axis, label in component.output_axes.get(output.name, {}).items():
            dim = output.type.tensor_type.shape.dim[axis]
            dim.ClearField("dim_value")
            dim.dim_param = label


def trace(module: TypedGraph, component: Component, inputs: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    """The raw torch.export trace (most of an export's time), before clean-up."""
    dynamic_shapes = tuple(component.dynamic_axes[n] for n in component.inputs)
    with warnings.catch_warnings(), quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            inputs,
            input_names=list(component.inputs),
            output_names=list(component.outputs),
            dynamic_shapes={"inputs": dynamic_shapes},
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def clean_up(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    model = onnxslim.slim(model)
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def export_component(
    component: Component,
    models: Models,
    dtype: str,
    path: Path,
) -> ExportResult:
    """Trace, clean up and write ``path`` atomically (temporary file + rename)."""
    policy = DEFAULT_POLICY[dtype]
    module = typed_module(component, models, policy)
    inputs = example_inputs(component, models, policy, component.export_size)
    start = time.perf_counter()
    with torch.no_grad():
        traced = trace(module, component, inputs)
    exported = time.perf_counter()
    cleaned = clean_up(traced)
    _name_output_axes(cleaned, component)
    cleaned_at = time.perf_counter()

    with atomic_output(path) as partial:
        onnx.save(cleaned, str(partial))
    return ExportResult(
        component=component.name,
        dtype=dtype,
        path=path,
        export_seconds=exported - start,
        cleanup_seconds=cleaned_at - exported,
        nodes_exported=len(traced.graph.node),
        nodes_final=len(cleaned.graph.node),
    )
