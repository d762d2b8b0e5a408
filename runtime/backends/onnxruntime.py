"""The ONNX Runtime backend: sessions on the artifact folder's graphs (CPU, CUDA or TensorRT
execution provider), and how it opens for each backend name (``onnxruntime``, the folder's CPU
graphs, ``onnxruntime-tensorrt`` with its engine cache in the user cache folder)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager

import numpy as np
import torch

from engines.manifest import CPU_INT8, ComponentRecord, Manifest, ManifestError, cpu_graphs
from engines.requirements import onnxruntime_missing

from ..cache import cache_dir
from ..cpu import cpu_matrix_units
from ..upscale_pass import PASS_COMPONENTS
from .base import Backend, BackendUnavailable, OwnStream, Tensors
from .registry import BackendSpec, OpenRequest, register

logger = logging.getLogger(__name__)


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


def _shape_list(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(s) for s in shape)}" for name, shape in shapes.items())


def tensorrt_provider_options(record: ComponentRecord, cache_folder: Path, device_index: int) -> dict:
    """ONNX Runtime TensorRT provider options for one component of an artifact folder.

    - Engine and timing caches in ``cache_folder``; the engine prefix carries the graph's sha256 (so
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
        "trt_engine_cache_path": str(cache_folder),
        "trt_engine_cache_prefix": f"{record.name}_{record.precision}_{record.onnx_sha256[:16]}",
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_folder),
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
        required = [n for n in self._unavailable if n in PASS_COMPONENTS]
        if required:
            raise BackendUnavailable(self._unavailable[required[0]])

    def require_io(self, manifest: Manifest) -> None:
        """Refuse a graph whose inputs or outputs are not its component's (a hand-edited manifest
        that names another component's file, its hash still matching) before it runs."""
        for name, session in self._sessions.items():
            record = manifest.components[name]
            found = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
            if (sorted(found[0]), sorted(found[1])) != (sorted(record.inputs), sorted(record.outputs)):
                what = "CPU graph" if name in self._variant else "ONNX graph"
                raise ManifestError(
                    f"the {what} the manifest names for {name} takes {found[0]} and gives {found[1]}, but {name} "
                    f"takes {record.inputs} and gives {record.outputs}: the manifest names another component's "
                    f"graph; rebuild with: {manifest.rebuild_command}"
                )

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


def _numpy_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return torch.empty((), dtype=dtype).numpy().dtype.type



CPU_GRAPHS = "onnxruntime-cpu-int8"  # the folder's CPU graphs on ONNX Runtime: auto's, or onnxruntime with precision int8
ORT_TENSORRT_CACHE = "onnxruntime-tensorrt"  # its engine and timing caches, under the user cache folder


def _graphs(request: OpenRequest) -> dict[str, Path]:
    return {name: request.folder / record.onnx_file for name, record in request.manifest.components.items()
            if request.only is None or name in request.only}


def _checked(backend: OnnxRuntimeBackend, request: OpenRequest) -> Backend:
    """``backend`` once its graphs are the manifest's components' (``require_io``); closed if not."""
    try:
        backend.require_io(request.manifest)
    except ManifestError:
        backend.close()
        raise
    return backend


def _open_graphs(request: OpenRequest) -> Backend:
    return _checked(OnnxRuntimeBackend(_graphs(request), request.device,
                                       provider="cpu" if request.device.type == "cpu" else "cuda"), request)


def _open_cpu_graphs(request: OpenRequest) -> Backend:
    if request.device.type != "cpu":
        raise BackendUnavailable(f"the folder's CPU graphs run on ONNX Runtime's CPU provider, not on {request.device}")
    graphs = _graphs(request)
    try:
        graphs.update(cpu_graphs(request.folder, request.manifest, PASS_COMPONENTS))
    except ManifestError as exc:  # none made, or one missing or changed: auto runs its next path
        raise BackendUnavailable(str(exc)) from exc
    if not cpu_matrix_units().int8_dot:
        logger.warning("the folder's CPU graphs on a CPU without int8 dot products (VNNI/AMX-INT8): ONNX Runtime's "
                       "int8 kernels multiply in 16-bit pairs here, which can saturate; auto would not run them")
    return _checked(OnnxRuntimeBackend(graphs, request.device, provider="cpu", variant=CPU_INT8,
                                       variant_components=PASS_COMPONENTS), request)


def _open_with_tensorrt(request: OpenRequest) -> Backend:
    device = request.device
    if device.type != "cuda":
        raise BackendUnavailable(f"the ONNX Runtime TensorRT provider needs a CUDA device, got {device}")
    try:  # never in the artifact folder, which the runtime does not write
        cache = cache_dir(ORT_TENSORRT_CACHE, request.folder)
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendUnavailable(f"the ONNX Runtime TensorRT provider needs a writable engine cache: {exc}") from exc
    options = {n: tensorrt_provider_options(r, cache, device.index or 0) for n, r in request.manifest.components.items()}
    return _checked(OnnxRuntimeBackend(_graphs(request), device, provider="tensorrt", provider_options=options), request)


register(BackendSpec("onnxruntime", "onnxruntime (the cpu extra) or onnxruntime-gpu for CUDA; the folder's graphs",
                     ("cpu", "cuda"), _open_graphs))
register(BackendSpec("onnxruntime-tensorrt", "onnxruntime-gpu with TensorRT 10 and a CUDA GPU (the trt and gpu extras)",
                     ("cuda",), _open_with_tensorrt))
register(BackendSpec(CPU_GRAPHS, "onnxruntime and a folder built with its CPU graphs (int8); the CPU",
                     ("cpu",), _open_cpu_graphs, choosable=False))
