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
from pathlib import Path

import onnx
import torch

from engines.files import atomic_output
from export.onnx import exporter

TRACE_MEMO = "FLOW_UPSCALER_TEST_TRACE_MEMO"  # the folder; children started by tests inherit it


def _key(module: torch.nn.Module, component, inputs: tuple[torch.Tensor, ...]) -> str:
    digest = hashlib.sha256()
    for part in (torch.__version__, exporter.OPSET, component.name, repr(component.dynamic_axes), repr(module),
                 [(tuple(x.shape), str(x.dtype)) for x in inputs]):
        digest.update(repr(part).encode())
    for name, part in module.named_modules():  # settings a forward may read besides its weights
        settings = {k: v for k, v in vars(part).items() if isinstance(v, (bool, int, float, str, tuple, torch.dtype))}
        digest.update(f"{name}{type(part).__qualname__}{sorted(settings.items(), key=str)}".encode())
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


def install(folder: Path | None = None) -> None:
    """Memoize ``exporter.trace`` in this process (``folder`` or the one ``TRACE_MEMO`` names)."""
    folder = Path(folder or os.environ[TRACE_MEMO])
    folder.mkdir(parents=True, exist_ok=True)
    exporter.trace = memoized(exporter.trace, folder)
