"""Backends: one small interface over TensorRT engines, ONNX Runtime sessions and eager PyTorch.

A backend runs one component by name on named tensors and returns named tensors on its device.
It knows the artifact folder's components, not the pipeline: chaining, noise and tiling live in
``runtime.upscaler``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ContextManager

import numpy as np
import torch

from engines.manifest import ComponentRecord, Manifest
from engines.memory import onnxruntime_missing

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

    def on_stream(self) -> ContextManager[torch.cuda.Stream | None]:
        """Run the block on the backend's own CUDA stream, if it has one; yields the caller's stream.

        Work in the block is ordered after the caller's earlier work and before its later work, so a
        caller (the ``Upscaler``) can run a whole call there. Backends without a stream of their own
        run on the caller's and yield None.
        """
        return nullcontext()

    def close(self) -> None:
        """Free what the backend holds; it cannot run afterwards."""


class OwnStream:
    """A backend's CUDA stream, ordered against the caller's current stream with events.

    Entering waits (on the GPU, not the host) for the caller's stream, makes the backend stream
    current under a device guard, and on exit makes the caller's stream wait for the backend's.
    One stream for all of a backend's work serialises it on the GPU, so buffers the backend
    reuses are never written by one call while another call still reads them. Nested scopes are free.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    @contextmanager
    def scope(self) -> Iterator[torch.cuda.Stream | None]:
        caller = torch.cuda.current_stream(self.device)
        if caller == self.stream:
            yield None
            return
        self.stream.wait_stream(caller)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                yield caller
        finally:
            caller.wait_stream(self.stream)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def _from_numpy(x: np.ndarray) -> torch.Tensor:
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


TENSORRT_PROVIDER = "TensorrtExecutionProvider"
# ONNX Runtime's TensorRT provider (1.31) builds weakly typed networks: the graph's types are hints,
# and these flags say which reduced precisions TensorRT may use. The layer-norm fallback keeps
# normalisation statistics in fp32 where TensorRT recognises them. fp8 Q/DQ graphs need the
# strongly typed build of the tensorrt backend.
ORT_TENSORRT_PRECISION = {
    "fp32": {},
    "fp16": {"trt_fp16_enable": True, "trt_layer_norm_fp32_fallback": True},
    "bf16": {"trt_bf16_enable": True, "trt_layer_norm_fp32_fallback": True},
    "int8": {"trt_int8_enable": True, "trt_fp16_enable": True},
}
ORT_TENSORRT_CACHE = "onnxruntime_tensorrt_cache"


def _shape_list(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(s) for s in shape)}" for name, shape in shapes.items())


def tensorrt_provider_options(record: ComponentRecord, cache_dir: Path, device_index: int) -> dict:
    """ONNX Runtime TensorRT provider options for one component of an artifact folder.

    - Engine and timing caches in ``cache_dir``; the engine prefix carries the graph's sha256 (so
      new weights never load an old engine) and its precision. ONNX Runtime adds the TensorRT,
      CUDA and ONNX Runtime versions and the compute capability to the file name itself.
    - One profile from the smallest size to the largest, tuned at the first profile's size (the
      first pass's): ONNX Runtime 1.31 builds several profiles but runs only the first. Its batch
      limit is the largest profile's, which the memory budget allows at the largest size.
    """
    flags = ORT_TENSORRT_PRECISION.get(record.precision)
    if flags is None:
        raise BackendUnavailable(
            f"ONNX Runtime's TensorRT provider cannot build {record.precision} graphs as typed; use the tensorrt backend"
        )
    smallest, largest = record.profiles[0], record.profiles[-1]
    return {
        "device_id": device_index,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_engine_cache_prefix": f"{record.name}_{record.precision}_{record.onnx_sha256[:16]}",
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": _shape_list(smallest.min),
        "trt_profile_opt_shapes": _shape_list(smallest.opt),
        "trt_profile_max_shapes": _shape_list(largest.max),
        **flags,
    }


def require_provider(session, wanted: str, path: Path) -> None:
    """Refuse a session that does not run on ``wanted``: ONNX Runtime drops a provider that fails
    to load (TensorRT's libraries missing, another TensorRT major) and carries on without it."""
    running = session.get_providers()
    if not running or running[0] != wanted:
        raise BackendUnavailable(
            f"ONNX Runtime could not start {wanted} for {Path(path).name} (the session runs on "
            f"{', '.join(running) or 'nothing'}); its log above says why. The TensorRT provider of "
            "onnxruntime-gpu 1.31 needs TensorRT 10 (pip install -e '.[trt,gpu]')"
        )


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime sessions on the artifact folder's graphs.

    CPU: tensors are shared with numpy, no copies. CUDA / TensorRT execution providers: inputs are
    bound to the torch tensors' device memory with IO binding; outputs are allocated by ONNX
    Runtime on the device and handed over through DLPack. The TensorRT provider runs alone
    (no CUDA or CPU provider behind it, no fall-back): a session that does not run every node on
    TensorRT is refused.
    """

    PROVIDERS = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": [TENSORRT_PROVIDER],
    }

    def __init__(
        self,
        graphs: dict[str, Path],
        device: torch.device,
        provider: str = "cpu",
        provider_options: dict[str, dict] | None = None,
    ):
        """``graphs``: ONNX file per component (an artifact folder's, or any staged graphs);
        ``provider_options``: per component, the options of the first provider (TensorRT's)."""
        missing = onnxruntime_missing()
        if missing:
            raise BackendUnavailable(missing)
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = self.PROVIDERS[provider][0]
        if wanted not in available:
            raise BackendUnavailable(
                f"ONNX Runtime here has no {wanted} (it has {', '.join(available)}); "
                "install onnxruntime-gpu (pip install -e '.[gpu]', in place of onnxruntime: both wheels write "
                "the same package) for CUDA and TensorRT providers"
            )
        if (provider == "cpu") != (device.type == "cpu"):
            raise BackendUnavailable(f"the ONNX Runtime {provider} provider cannot run on device {device}")
        if provider == "tensorrt":
            try:  # the tensorrt wheel loads libnvinfer from its own folder, where the provider finds it
                import tensorrt  # noqa: F401
            except ImportError:
                pass
        self.name = f"onnxruntime-{provider}"
        self.device = device
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if provider == "tensorrt":
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        providers = self.PROVIDERS[provider]
        self._sessions, self._unavailable = {}, {}
        for name, path in graphs.items():
            first = (provider_options or {}).get(name, {"device_id": device.index or 0})
            provider_list = [
                (p, {} if p == "CPUExecutionProvider" else first if i == 0 else {"device_id": device.index or 0})
                for i, p in enumerate(providers)
            ]
            try:
                session = ort.InferenceSession(
                    str(path), sess_options=options, providers=provider_list, enable_fallback=0
                )
                require_provider(session, wanted, path)
                self._sessions[name] = session
            except BackendUnavailable as exc:
                self._unavailable[name] = str(exc)
            except Exception as exc:  # ONNX Runtime raises its own types for graphs it cannot run
                reason = str(exc).splitlines()[0][-300:].rstrip(".")
                hint = {
                    "cpu": "bf16 graphs need a GPU provider; rebuild with another precision or use the torch backend",
                    "cuda": "use the tensorrt or torch backend",
                    # A provider that failed to load leaves the nodes to the CPU, which the session refuses.
                    "tensorrt": "its TensorRT provider needs TensorRT 10's libraries (pip install -e '.[trt,gpu]') "
                                "and every node supported by TensorRT; or use the tensorrt or torch backend",
                }[provider]
                self._unavailable[name] = f"ONNX Runtime ({provider}) cannot run {Path(path).name}: {reason}. {hint}"
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
        bound = []  # the bound memory must stay alive until the run ends
        for name, tensor in inputs.items():
            tensor = tensor.contiguous()
            bound.append(tensor)
            binding.bind_input(
                name, "cuda", self.device.index or 0, _numpy_dtype(tensor.dtype), tuple(tensor.shape), tensor.data_ptr()
            )
        for name in names:
            binding.bind_output(name, "cuda", self.device.index or 0)
        # ONNX Runtime runs on a stream of its own that does not wait for torch's: the inputs were
        # just written on torch's current stream.
        torch.cuda.current_stream(self.device).synchronize()
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
        except (ValueError, TypeError, KeyError, CheckpointError) as exc:  # a hand-edited weight record too
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
