"""Backends: one small interface over TensorRT engines, ONNX Runtime sessions and eager PyTorch.

A backend runs one component by name on named tensors and returns named tensors on its device.
It knows the artifact folder's components, not the pipeline: chaining, noise and tiling live in
``runtime.upscaler``.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ContextManager

import numpy as np
import torch

from engines.errors import FlowUpscalerError
from engines.manifest import ComponentRecord, Manifest
from engines.requirements import onnxruntime_missing

from .upscale_pass import TIMESTEP
from .numerics import full_fp32

Tensors = dict[str, torch.Tensor]
logger = logging.getLogger(__name__)


class BackendUnavailable(FlowUpscalerError, RuntimeError):
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

    def fused_pass(self, latents_small: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """``(latents_small, noise) -> x0`` running a whole 2x pass as one unit (a compiled graph),
        if the backend has one for these inputs; None: the pipeline calls ``run`` per component."""
        return None

    def close(self) -> None:
        """Free what the backend holds; it cannot run afterwards."""

    def run_precision(self, component: str) -> str | None:
        """The float precision this backend runs ``component`` in when it is not the folder's graph's
        own (the torch backend's modes); None: as built. The check set holds it to that precision's
        limits (``runtime.checkset``)."""
        return None

    def verification_identity(self) -> dict | None:
        """What makes this backend's results on this machine its own (engine hashes, GPU, driver,
        runtime version), for backends whose engines were built where they could not run: the
        runtime checks them on first use against the folder's check set and caches the verdict under
        a hash of this (``runtime.checkset``). None: nothing to check (graphs and eager models run
        as built and validated)."""
        return None


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

    CPU: tensors are shared with numpy, no copies. CUDA / TensorRT execution providers: the
    sessions run on the backend's own CUDA stream (``user_compute_stream``; ``on_stream``), so
    they are ordered against torch's work by events, never by a host synchronisation, and a run
    returns once its work is queued. Inputs are bound to the torch tensors' device memory with IO
    binding; temporaries made for binding are allocated on that stream, so the caching allocator
    cannot hand their memory to anything that runs before the session has read them. Outputs are
    allocated by ONNX Runtime on the device and handed over through DLPack. The TensorRT provider
    runs alone (no CUDA or CPU provider behind it, no fall-back): a session that does not run
    every node on TensorRT is refused.

    ``cuda_options``: extra CUDA provider options (``cudnn_conv_algo_search``, ``prefer_nhwc``),
    the knobs the benchmarks compare. ``variant``: the encoding of graphs other than the folder's own
    (``cpu-int8``: its CPU graphs), for ``variant_components``; it names the backend and is what
    ``run_precision`` reports for them.
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
        cuda_options: dict[str, str] | None = None,
        variant: str | None = None,
        variant_components: tuple[str, ...] = (),
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
        self.name = f"onnxruntime-{variant or provider}"
        self._variant = {name: variant for name in variant_components} if variant else {}
        self.device = device
        self._stream = OwnStream(device) if device.type == "cuda" else None
        gpu_options = {"device_id": device.index or 0}
        if self._stream is not None:
            gpu_options.update(has_user_compute_stream="1", user_compute_stream=str(self._stream.stream.cuda_stream))
        self._run_options = ort.RunOptions()
        # Run returns once the work is queued on our stream; the caller's stream waits for it by event.
        self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if provider == "cpu":  # the same threads as torch's (torch.set_num_threads, OMP_NUM_THREADS)
            options.intra_op_num_threads = torch.get_num_threads()
        if provider == "tensorrt":
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        providers = self.PROVIDERS[provider]
        self._sessions, self._unavailable = {}, {}
        for name, path in graphs.items():
            first = {**gpu_options, **(provider_options or {}).get(name, {})}
            if provider == "cuda":
                first.update(cuda_options or {})
            provider_list = [
                (p, {} if p == "CPUExecutionProvider" else first if i == 0 else gpu_options)
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
                if not Path(path).is_file():  # vanished since the manifest was checked: no other diagnosis
                    self._unavailable[name] = f"ONNX Runtime cannot run {Path(path).name}: the file is gone ({reason})"
                    continue
                bf16 = ".bf16." in Path(path).name
                hint = {
                    "cpu": ("bf16 graphs need a GPU provider; rebuild with another precision or use the torch backend"
                            if bf16 else "rebuild the folder, or use the torch backend"),
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

    def on_stream(self) -> ContextManager[torch.cuda.Stream | None]:
        return nullcontext() if self._stream is None else self._stream.scope()

    def run_precision(self, component: str) -> str | None:
        return self._variant.get(component)

    def run(self, component: str, inputs: Tensors) -> Tensors:
        self.check(component)
        session = self._sessions[component]
        names = [o.name for o in session.get_outputs()]
        if self._stream is None:
            outputs = session.run(names, {k: _to_numpy(v) for k, v in inputs.items()})
            return {n: _from_numpy(o) for n, o in zip(names, outputs)}
        with self._stream.scope() as caller:
            binding = session.io_binding()
            bound = []  # alive until the run is queued; allocated on our stream when made here
            for name, tensor in inputs.items():
                if caller is not None:  # made on the caller's stream, read on ours
                    tensor.record_stream(self._stream.stream)
                tensor = tensor.contiguous()
                bound.append(tensor)
                binding.bind_input(
                    name, "cuda", self.device.index or 0, _numpy_dtype(tensor.dtype), tuple(tensor.shape), tensor.data_ptr()
                )
            for name in names:
                binding.bind_output(name, "cuda", self.device.index or 0)
            session.run_with_iobinding(binding, self._run_options)
            return {n: torch.from_dlpack(v) for n, v in zip(names, binding.get_outputs())}

    def close(self) -> None:
        self._sessions.clear()


class DecoderElsewhere(Backend):
    """The pass on one backend, the decoder on another, opened at the first decode (or check of it).

    ``auto`` runs a folder's CPU graphs (int8, the pass only) this way: decoding stays on the path
    it would take without them (torch's bf16 decoder on CPUs with bf16 units), and an app that never
    decodes never loads a decoder. ``open_decoder`` returns that backend or raises
    ``BackendUnavailable``.
    """

    def __init__(self, main: Backend, open_decoder: Callable[[], Backend], decoder: str = "vae_decoder"):
        self.main, self.name, self.device = main, main.name, main.device
        self._open_decoder, self._decoder_name = open_decoder, decoder
        self._decoder: Backend | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def opened_decoder(self) -> Backend | None:
        """The decoder's backend if a decode (or its check) has opened it, else None."""
        return self._decoder

    def decoder(self) -> Backend:
        """The decoder's backend, opened at the first call that succeeds (a failure is tried again
        next time: what failed may have been a file a rebuild replaced)."""
        with self._lock:
            if self._closed:
                raise BackendUnavailable(f"this {self.main.name} backend is closed")
            if self._decoder is None:
                try:
                    self._decoder = self._open_decoder()
                except BackendUnavailable as exc:
                    raise BackendUnavailable(f"{self.main.name} runs the pass only, and none of the backends after "
                                             f"it in auto's order can decode here: {exc}") from exc
                logger.info("%s: decoding on %s", self.main.name, self._decoder.name)
            return self._decoder

    def _for(self, component: str) -> Backend:
        return self.decoder() if component == self._decoder_name else self.main

    def check(self, component: str) -> None:
        self._for(component).check(component)

    def run(self, component: str, inputs: Tensors) -> Tensors:
        return self._for(component).run(component, inputs)

    def run_precision(self, component: str) -> str | None:
        return self._for(component).run_precision(component)

    def memory_bytes(self) -> int:
        return self.main.memory_bytes() + (self._decoder.memory_bytes() if self._decoder is not None else 0)

    def close(self) -> None:
        with self._lock:
            decoder, self._decoder, self._closed = self._decoder, None, True
            try:
                self.main.close()
            finally:
                if decoder is not None:
                    decoder.close()


def _numpy_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return torch.empty((), dtype=dtype).numpy().dtype.type


TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
# torch.compile modes; the ones that capture CUDA graphs replay a whole pass per shape on the GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class TorchBackend(Backend):
    """Eager (or compiled) PyTorch, rebuilt from the weights the manifest names.

    The only runtime code that imports ``export``, and only its model definitions
    (``export.models``, ``export.checkpoint``), lazily. The weights are checked against the digests
    recorded at build time, so this backend runs exactly what the graphs were exported from.

    - ``precision="fp32"`` (default) is the reference: IEEE fp32, TF32 off while it runs
      (``runtime.numerics.full_fp32``). ``fp16``/``bf16`` follow the exported graphs' precision
      policy (``export.models.precision``: fp32 time embedding and GroupNorm statistics, fp32 at
      the pass's boundaries); the VAE decoder then runs in bf16 (FLUX's VAE overflows fp16).
    - ``compile_mode`` (one of ``COMPILE_MODES``): channels-last weights, and ``torch.compile`` of
      the whole pass (encoder, U-Net, ``x0 = noise - v``) and of the decoder, one compilation per
      input shape (the first call at a shape pays it; Inductor's on-disk cache, under
      ``TORCHINDUCTOR_CACHE_DIR``, spares a second process most of it). ``reduce-overhead`` and
      ``max-autotune`` replay each shape's pass as a CUDA graph.
    - On the CPU, ``bf16`` runs channels-last: oneDNN's convolutions on the CPU's bf16 matrix units
      (AMX, AVX-512 BF16; ``runtime.cpu``), what ``auto`` chooses on such CPUs.
    """

    name = "torch"

    def __init__(
        self,
        manifest: Manifest,
        device: torch.device,
        precision: str = "fp32",
        compile_mode: str | None = None,
        offline: bool = False,
        components: tuple[str, ...] | None = None,
        models: object | None = None,
    ):
        """``offline``: rebuild from local weights (files, the Hugging Face cache) only, never a
        download: what ``auto`` asks, so that a folder copied without its weights falls back to
        its graphs at once. ``components``: the folder's components to rebuild (default: all).
        ``models``: the fp32 eager models (``export.models.components.Models``) already loaded,
        instead of the manifest's weight record (``runtime.checkpoint``: a checkpoint without a folder)."""
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)} or None, got {compile_mode!r}")
        needs = "the torch backend needs the model code's packages (pip install -e '.[models]')"
        try:
            from export.checkpoint import CheckpointError
            from export.models.components import PARTS, Models
            from export.models.precision import DEFAULT_POLICY, apply_policy, typed_part
            from export.models.weights_record import models_from_weights_record
        except ImportError as exc:  # an app installed with the runtime's core and no `models` extra
            raise BackendUnavailable(f"{needs}: {exc}") from exc

        try:
            names = [n for n in manifest.components if components is None or n in components]
            if models is None:
                models = models_from_weights_record(manifest.weights, names, offline=offline)
        except ImportError as exc:  # huggingface_hub, imported when a checkpoint is read
            raise BackendUnavailable(f"{needs}: {exc}") from exc
        except CheckpointError as exc:  # the weights could not be read (offline: not in a local cache)
            hint = " (auto reads local files and the Hugging Face cache only; backend='torch' downloads)" if offline else ""
            raise BackendUnavailable(f"the torch backend cannot rebuild the models{hint}: {exc}") from exc
        except (ValueError, TypeError, KeyError) as exc:  # no source recorded, other weights; a hand-edited record
            raise BackendUnavailable(f"the torch backend cannot rebuild the models: {exc}") from exc
        self.device, self.precision, self.compile_mode = device, precision, compile_mode
        self.name = "torch" if precision == "fp32" and compile_mode is None else (
            f"torch-{precision}" + (f"-compile-{compile_mode}" if compile_mode else "")
        )
        policy = DEFAULT_POLICY[precision]
        decoder_policy = DEFAULT_POLICY["fp32" if precision == "fp32" else "bf16"]
        if models.unet is not None and precision != "fp32":
            models = Models(unet=apply_policy(models.unet, policy), vae=models.vae, cut=models.cut)
        # oneDNN runs bf16/fp16 convolutions on the CPU's matrix units in channels-last only
        # (NCHW bf16 is no faster than fp32 there: benchmarks/results/cpu_latency.md).
        self._channels_last = compile_mode is not None or (device.type == "cpu" and precision != "fp32")
        self._modules, self._parts = {}, {}
        for name in names:
            part = PARTS[name]
            module, part_policy = part.module(models), policy
            if part.needs == "vae":
                part_policy = decoder_policy
                module = apply_policy(module, part_policy) if part_policy.dtype != "fp32" else module
            module = typed_part(part, module, part_policy.torch_dtype).to(device)
            if self._channels_last:
                module = module.to(memory_format=torch.channels_last)
            self._modules[name], self._parts[name] = module, part
        self._decode = self._modules.get("vae_decoder")
        self._pass = None
        self.compile_seconds: dict[tuple[int, ...], float] = {}  # first call per latents_small shape
        if compile_mode is not None:
            self._pass = torch.compile(self._eager_pass, mode=compile_mode, dynamic=False, fullgraph=True)
            if self._decode is not None:
                self._decode = torch.compile(self._decode, mode=compile_mode, dynamic=False, fullgraph=True)

    def _numerics(self) -> ContextManager[None]:
        return full_fp32() if self.precision == "fp32" else nullcontext()

    def _eager_pass(self, latents_small: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        timestep = torch.full((latents_small.shape[0],), TIMESTEP, dtype=torch.float32, device=latents_small.device)
        encoded = self._modules["cond_encoder"](latents_small, timestep)
        return noise - self._modules["unet"](noise, *encoded)

    def _prepared(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._channels_last and tensor.dim() == 4:
            return tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def fused_pass(self, latents_small: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        if self._pass is None or "cond_encoder" not in self._modules:
            return None
        return self._run_compiled_pass

    @torch.no_grad()
    def _run_compiled_pass(self, latents_small: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.compile_mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        shape = tuple(latents_small.shape)
        started = time.perf_counter()
        with self._numerics():
            x0 = self._pass(self._prepared(latents_small), self._prepared(noise))
        if shape not in self.compile_seconds:  # the first call at a shape compiles it
            self.compile_seconds[shape] = time.perf_counter() - started
            logger.info("torch backend: compiled the pass for %s in %.1f s", shape, self.compile_seconds[shape])
        return self._handed_over(x0)

    def _handed_over(self, tensor: torch.Tensor) -> torch.Tensor:
        """An fp32 output as the caller gets it: the standard layout, and memory of its own where
        a CUDA graph would overwrite it on its next replay."""
        if self.compile_mode in CUDA_GRAPH_MODES:
            return tensor.clone(memory_format=torch.contiguous_format)
        return tensor.contiguous()

    @torch.no_grad()
    def run(self, component: str, inputs: Tensors) -> Tensors:
        part = self._parts[component]
        args = [self._prepared(inputs[n]) for n in part.inputs]
        compiled = component == "vae_decoder" and self.compile_mode is not None
        if compiled and self.compile_mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        with self._numerics():
            result = (self._decode if compiled else self._modules[component])(*args)
        result = (result,) if isinstance(result, torch.Tensor) else result
        return {
            n: self._handed_over(r) if n in part.fp32_outputs else r for n, r in zip(part.outputs, result)
        }

    def run_precision(self, component: str) -> str | None:
        if self.precision == "fp32":
            return "fp32"
        return "bf16" if self._parts[component].needs == "vae" else self.precision

    def memory_bytes(self) -> int:
        if self.device.type == "cpu":
            return 0
        # cond_encoder and unet share one U-Net: count each tensor once.
        tensors = {t.data_ptr(): t for m in self._modules.values() for t in m.state_dict().values()}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> None:
        self._modules.clear()
        self._pass = self._decode = None
