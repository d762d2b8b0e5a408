"""One torch.export trace per module state in a test run.

Tracing is most of every small build's time, and a trace depends only on the module (its
architecture and weights), the component and the example inputs' shapes and dtypes: builds of the
same small models in many tests share the first one, stored as ONNX under ``TRACE_MEMO``'s folder.
Each distinct trace is made once per run, by the exporter under test, whichever test needs it
first; clean-up, validation against eager and every later stage run for real in every test.
Tests that need weights other than the small models' (seed 0) take seed 1, so those are shared too.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import fields
from pathlib import Path

import onnx
import torch

from engines.files import atomic_output
from export.onnx import exporter

TRACE_MEMO = "FLOW_UPSCALER_TEST_TRACE_MEMO"  # the folder; children started by tests inherit it


def _describe(value) -> str:
    """A text of ``value`` that is the same in every process: plain values as they are, containers
    item by item, functions and methods by their code, anything else by its type."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return repr(value)
    if isinstance(value, (tuple, list, set, frozenset)):
        items = [_describe(item) for item in value]
        return f"{type(value).__name__}({sorted(items) if isinstance(value, (set, frozenset)) else items})"
    if isinstance(value, dict):
        return f"dict({sorted(f'{_describe(k)}: {_describe(v)}' for k, v in value.items())})"
    code = getattr(getattr(value, "__func__", value), "__code__", None)
    if code is not None:
        return f"code({code.co_filename}:{code.co_firstlineno}, {code.co_names}, {code.co_code.hex()})"
    return f"object({type(value).__module__}.{type(value).__qualname__})"


def _key(module: torch.nn.Module, component, inputs: tuple[torch.Tensor, ...]) -> str:
    digest = hashlib.sha256()
    plain = {f.name: _describe(getattr(component, f.name)) for f in fields(component)
             if not callable(getattr(component, f.name))}  # the builders: the module is what is traced
    for part in (torch.__version__, exporter.OPSET, plain, [(tuple(x.shape), str(x.dtype)) for x in inputs]):
        digest.update(repr(part).encode())
    for name, part in module.named_modules():  # what a forward may read besides the weights
        settings = {k: _describe(v) for k, v in vars(part).items() if k not in ("_parameters", "_buffers", "_modules")}
        digest.update(f"{name} {type(part).__module__}.{type(part).__qualname__} {_describe(type(part).forward)} "
                      f"{sorted(settings.items())}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def memoized(trace, folder: Path):
    def trace_once(module, component, inputs):
        path = folder / f"{component.name}.{_key(module, component, inputs)}.onnx"
        if path.is_file():
            return onnx.load(str(path))
        model = trace(module, component, inputs)
        with atomic_output(path, shared=True) as partial:
            onnx.save(model, str(partial))
        return model

    return trace_once


def install() -> None:
    """Memoize ``exporter.trace`` in a build a test started, in the folder ``TRACE_MEMO`` names."""
    folder = Path(os.environ[TRACE_MEMO])
    folder.mkdir(parents=True, exist_ok=True)
    exporter.trace = memoized(exporter.trace, folder)
