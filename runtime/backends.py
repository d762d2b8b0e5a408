"""Backends: one small interface over TensorRT engines, ONNX Runtime sessions and eager PyTorch.

A backend runs one component by name on named tensors and returns named tensors on its device.
It knows the artifact folder's components, not the pipeline: chaining, noise and tiling live in
``runtime.upscaler``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from engines.manifest import Manifest

Tensors = dict[str, torch.Tensor]


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (missing package, no GPU, no built engine); says which."""


class Backend(ABC):
    name: str
    device: torch.device

    @abstractmethod
    def run(self, component: str, inputs: Tensors) -> Tensors:
        """Run ``component`` on ``inputs`` (on ``self.device``); outputs by name, on the same device."""

    def check(self, component: str) -> None:
        """Raise ``BackendUnavailable`` if ``component`` cannot run here (checked before any work)."""

    def memory_bytes(self) -> int:
        """Device memory this backend holds (weights and scratch); 0 when it runs on the host."""
        return 0

    def close(self) -> None:
        """Free what the backend holds; it cannot run afterwards."""


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def _from_numpy(x: np.ndarray) -> torch.Tensor:
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime sessions on the artifact folder's graphs.

    CPU: tensors are shared with numpy, no copies. CUDA / TensorRT execution providers: inputs are
    bound to the torch tensors' device memory with IO binding; outputs are allocated by ONNX
    Runtime on the device and handed over through DLPack.
    """

    PROVIDERS = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    }

    def __init__(self, graphs: dict[str, Path], device: torch.device, provider: str = "cpu"):
        """``graphs``: ONNX file per component (an artifact folder's, or any staged graphs)."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = self.PROVIDERS[provider][0]
        if wanted not in available:
            raise BackendUnavailable(
                f"ONNX Runtime here has no {wanted} (it has {', '.join(available)}); "
                "install onnxruntime-gpu (pip install -e '.[gpu]') for CUDA and TensorRT providers"
            )
        if (provider == "cpu") != (device.type == "cpu"):
            raise BackendUnavailable(f"the ONNX Runtime {provider} provider cannot run on device {device}")
        self.name = f"onnxruntime-{provider}"
        self.device = device
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = self.PROVIDERS[provider]
        provider_options = [{} if p == "CPUExecutionProvider" else {"device_id": device.index or 0} for p in providers]
        self._sessions, self._unavailable = {}, {}
        for name, path in graphs.items():
            try:
                self._sessions[name] = ort.InferenceSession(
                    str(path),
                    sess_options=options,
                    providers=providers,
                    provider_options=provider_options,
                )
            except Exception as exc:  # ONNX Runtime raises its own types for graphs it cannot run
                reason = str(exc).splitlines()[0][-300:].rstrip(".")
                self._unavailable[name] = (
                    f"ONNX Runtime ({provider}) cannot run {Path(path).name}: {reason}. "
                    "bf16 graphs need a GPU provider; rebuild with another precision or use the torch backend"
                )
        required = [n for n in self._unavailable if n in ("cond_encoder", "unet")]
        if required:
            raise BackendUnavailable(self._unavailable[required[0]])

    def check(self, component: str) -> None:
        if component in self._unavailable:
            raise BackendUnavailable(self._unavailable[component])

    def run(self, component: str, inputs: Tensors) -> Tensors:
        self.check(component)
        session = self._sessions[component]
        names = [o.name for o in session.get_outputs()]
        if self.device.type == "cpu":
            outputs = session.run(names, {k: _to_numpy(v) for k, v in inputs.items()})
            return {n: _from_numpy(o) for n, o in zip(names, outputs)}
        binding = session.io_binding()
        for name, tensor in inputs.items():
            tensor = tensor.contiguous()
            binding.bind_input(
                name, "cuda", self.device.index or 0, _numpy_dtype(tensor.dtype), tuple(tensor.shape), tensor.data_ptr()
            )
        for name in names:
            binding.bind_output(name, "cuda", self.device.index or 0)
        session.run_with_iobinding(binding)
        return {n: torch.from_dlpack(v) for n, v in zip(names, binding.get_outputs())}

    def close(self) -> None:
        self._sessions.clear()


def _numpy_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return torch.empty((), dtype=dtype).numpy().dtype.type


class TorchBackend(Backend):
    """Eager PyTorch in fp32: the reference, rebuilt from the weights the manifest names.

    The only runtime code that imports ``export`` (lazily): the models are defined there. The
    weights are checked against the digests recorded at build time, so this backend runs exactly
    what the graphs were exported from.
    """

    name = "torch"

    def __init__(self, manifest: Manifest, device: torch.device):
        from export.build import models_from_weights_record
        from export.checkpoint import CheckpointError

        try:
            models = models_from_weights_record(manifest.weights, list(manifest.components))
        except (ValueError, CheckpointError) as exc:
            raise BackendUnavailable(f"the torch backend cannot rebuild the models: {exc}") from exc
        from export.onnx.components import COMPONENTS

        self.device = device
        self._modules = {
            name: COMPONENTS[name].module(models).to(device) for name in manifest.components
        }
        self._inputs = {name: COMPONENTS[name].inputs for name in manifest.components}
        self._outputs = {name: COMPONENTS[name].outputs for name in manifest.components}

    @torch.no_grad()
    def run(self, component: str, inputs: Tensors) -> Tensors:
        args = [inputs[n].float() for n in self._inputs[component]]
        result = self._modules[component](*args)
        result = (result,) if isinstance(result, torch.Tensor) else result
        return dict(zip(self._outputs[component], result))

    def memory_bytes(self) -> int:
        if self.device.type == "cpu":
            return 0
        # cond_encoder and unet share one U-Net: count each tensor once.
        tensors = {t.data_ptr(): t for m in self._modules.values() for t in m.state_dict().values()}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> None:
        self._modules.clear()
