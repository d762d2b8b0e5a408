"""TensorRT backend: engines run with ``execute_async_v3`` on torch memory, on the backend's stream.

- Both flavours (engines.flavours): TensorRT 10/11 and TensorRT-RTX engines run through this one
  backend. They differ in how an engine's contexts are made (TensorRT-RTX: a runtime
  configuration with its runtime cache, ``runtime.backends.tensorrt_rtx``) and in a validity check of the
  plan before it is deserialised; those calls sit in ``_ClassicRunSettings`` and
  ``runtime.backends.tensorrt_rtx.RtxRunSettings``, everything else is shared.
- ``from_folder`` checks the manifest against the running flavour, its version and the GPU before
  any engine loads; the constructor takes engine files directly (the build gates fresh engines
  that way, before their manifest exists).
- One launch per (component, input shapes), each with its own execution context: the context's
  optimisation profile (the smallest covering the shapes) and input shapes are set once, when the
  launch is made, and never change. So a CUDA graph captured on a launch's context stays valid,
  whatever other shapes run in between, and no profile switching happens on the hot path.
- Contexts use user-managed scratch memory. All launches share one scratch buffer, grown to the
  largest size the shapes actually run need: ``update_device_memory_size_for_shapes()`` is queried
  per launch, and returns less than the profile maximum for engines built with the preview feature
  RUNTIME_ACTIVATION_RESIZE_10_10 (TensorRT >= 10.10; the build sets it where it exists).
- Launches keep their output buffers: an output is valid until the same component runs again at
  the same shapes (the ``Upscaler`` consumes it before that). At most ``MAX_LAUNCHES`` launches per
  engine are kept (least recently used dropped), and ``memory_bytes`` counts their buffers.
- All work runs on the backend's own CUDA stream, ordered after the caller's stream and before the
  caller's next work with events (no host synchronisation), inside a device guard.
- The second run at the same shapes captures a CUDA graph of the launch (inputs copied into static
  buffers), replayed afterwards. A failed capture is logged, its CUDA error cleared, and the shapes
  keep plain launches.

TensorRT objects are held only in names (or attributes) called ``engine``, ``context`` or
``runtime``, and those names hold nothing else: ``tests/test_tensorrt_api.py`` checks every name
used on them against the real TensorRT 10 and 11 bindings.

Length: over 350 lines because an engine, its execution contexts, buffers, captured CUDA graphs
and stream are one resource with one lifetime, and ``tests/test_tensorrt_api.py`` checks its
TensorRT calls file by file; the TensorRT-RTX specifics are in ``tensorrt_rtx``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines.flavours import TENSORRT, TENSORRT_RTX, get_flavour
from engines.manifest import ManifestError, load_manifest, read_manifest
from engines.profiles import Profile, select_profile

from ..cache import cache_dir
from .base import Backend, BackendUnavailable, OwnStream, Tensors
from .registry import BackendSpec, OpenRequest, register

logger = logging.getLogger(__name__)

MAX_LAUNCHES = 8  # per engine: a chain to 8x runs 3 shapes per component, a tiled decode 1


@dataclass
class _Launch:
    """One component at one set of input shapes, on a context of its own."""

    context: object
    outputs: Tensors
    scratch_bytes: int
    bound_scratch: int | None = None  # the scratch address the context (and graph) were given
    runs: int = 0
    static_inputs: Tensors | None = None
    graph: torch.cuda.CUDAGraph | None = None
    capture_failed: bool = False
    cache_saved: bool = False  # TensorRT-RTX: this shape's compiled kernels were offered to the runtime cache

    def buffer_bytes(self) -> int:
        tensors = [*self.outputs.values(), *(self.static_inputs or {}).values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Engine:
    engine: object
    profiles: list[Profile]
    inputs: dict[str, torch.dtype]
    outputs: dict[str, torch.dtype]
    file_bytes: int
    sha256: str
    run_settings: object  # _ClassicRunSettings or RtxRunSettings: makes contexts, keeps the runtime cache
    launches: OrderedDict[tuple, _Launch] = field(default_factory=OrderedDict)


class _ClassicRunSettings:
    """TensorRT 10/11: contexts with user-managed scratch; nothing compiles at run time, nothing to keep."""

    def __init__(self, trt):
        self._trt = trt

    def create_context(self, engine):
        return engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)

    @staticmethod
    def capturable(context, stream: int) -> bool:
        """TensorRT 10/11 cannot say; a failed capture is handled where it happens."""
        return True

    def save_cache(self) -> None:
        pass


def _import_tensorrt(flavour: str = TENSORRT.name):
    about = get_flavour(flavour)
    try:
        if about is TENSORRT_RTX:
            from .tensorrt_rtx import import_module

            return import_module()
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(f"{about.title} is not installed ({about.install_hint}): {exc}") from exc
    return trt


def driver_version() -> str | None:
    """The NVIDIA driver's version (NVML), or the CUDA version it supports if NVML is missing."""
    try:
        nvml = ctypes.CDLL("nvml.dll" if sys.platform == "win32" else "libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            try:
                text = ctypes.create_string_buffer(96)
                if nvml.nvmlSystemGetDriverVersion(text, 96) == 0:
                    return text.value.decode()
            finally:
                nvml.nvmlShutdown()
    except (OSError, AttributeError):
        pass
    try:
        cuda = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        version = ctypes.c_int()
        if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return None


_LOGGERS: dict[object, object] = {}  # by TensorRT module


def _tensorrt_logger(trt):
    """One logger per TensorRT flavour and process: TensorRT warns when runtimes are given different ones."""
    if trt not in _LOGGERS:
        _LOGGERS[trt] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt]


def _torch_dtypes(trt) -> dict:
    return {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
    }


def _clear_pending_cuda_error(device: torch.device) -> str | None:
    """Read and clear a pending CUDA error left by a failed capture; returns its message.

    torch has no binding for ``cudaGetLastError``, but its kernel-launch check calls it: a tiny
    kernel launch raises the pending error once and clears it, so it cannot surface later in an
    unrelated operation.
    """
    try:
        torch.ones(1, device=device)
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


def _release_capture_pool(device: torch.device, pool) -> None:
    """Give back the memory pool of a failed capture.

    ``capture_end`` stops before releasing the allocator's capture pool when CUDA rejects the
    capture; left registered, the allocator would defer frees of tensors used on other streams
    for ever. Private torch calls (those ``torch.cuda.memory.use_mem_pool`` makes): where they do
    not exist, say so rather than fail the call that only wanted a faster replay.
    """
    try:
        torch._C._cuda_endAllocateToPool(device.index, pool)
        torch._C._cuda_releasePool(device.index, pool)
    except (AttributeError, RuntimeError) as exc:
        logger.warning("could not release the failed capture's memory pool (%s)", exc)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engines: dict[str, tuple[Path, list[Profile]]], device: torch.device, cuda_graphs: bool = True,
                 flavour: str = TENSORRT.name, cache_folder: Path | None = None):
        """``engines``: per component, its engine file and the profiles it was built with.
        ``flavour``: which TensorRT built them. ``cache_folder``: where TensorRT-RTX keeps its
        compiled kernels (None: not kept)."""
        about = get_flavour(flavour)
        trt = _import_tensorrt(flavour)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable(f"{about.title} needs a CUDA GPU, and this machine has none ({device} asked)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        self._trt = trt
        self.flavour = about
        self.device = device
        self.gpu = {"name": props.name, "compute_capability": "%d.%d" % (props.major, props.minor),
                    "driver": driver_version()}
        self._cuda_graphs = cuda_graphs
        self._stream = OwnStream(device)
        self._scratch = torch.empty(0, dtype=torch.uint8, device=device)
        dtypes = _torch_dtypes(trt)
        self._engines: dict[str, _Engine] = {}
        with torch.cuda.device(device):
            tensorrt_logger = _tensorrt_logger(trt)
            try:
                runtime = trt.Runtime(tensorrt_logger)
            except (TypeError, RuntimeError) as exc:  # pybind raises TypeError when the factory returns null
                raise BackendUnavailable(
                    f"TensorRT could not start on {device} ({exc}); check the NVIDIA driver against TensorRT "
                    f"{trt.__version__}'s CUDA requirement"
                ) from exc
            # The engines need their runtime, and the runtime its logger, for as long as they live.
            self._keep_alive = (tensorrt_logger, runtime)
            for name, (path, profiles) in engines.items():
                try:
                    plan = Path(path).read_bytes()
                except OSError as exc:
                    raise BackendUnavailable(f"could not read the engine {path} ({exc})") from exc
                if about is TENSORRT_RTX:
                    from .tensorrt_rtx import plan_problem

                    problem = plan_problem(trt, runtime, plan)
                    if problem:
                        raise BackendUnavailable(f"TensorRT-RTX {trt.__version__} cannot run {path} on {props.name}: "
                                                 f"{problem}; rebuild the folder for this GPU and version")
                try:
                    engine = runtime.deserialize_cuda_engine(plan)
                except (TypeError, RuntimeError) as exc:
                    raise BackendUnavailable(f"{about.title} could not load {path} ({exc}); rebuild the engines") from exc
                if engine is None:
                    raise BackendUnavailable(
                        f"{about.title} could not load {path} (see its log above); rebuild the engines"
                    )
                tensors = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
                kinds: dict[bool, dict[str, torch.dtype]] = {True: {}, False: {}}
                for tensor in tensors:
                    dtype = engine.get_tensor_dtype(tensor)
                    if dtype not in dtypes:
                        raise BackendUnavailable(f"{path}: tensor {tensor} has type {dtype}, which this runtime does not handle")
                    kinds[engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT][tensor] = dtypes[dtype]
                sha256 = hashlib.sha256(plan).hexdigest()
                if about is TENSORRT_RTX:
                    from .tensorrt_rtx import RtxRunSettings, runtime_cache_file

                    cache = runtime_cache_file(cache_folder, sha256, self.gpu, trt.__version__) if cache_folder else None
                    run_settings = RtxRunSettings(trt, engine, cache)
                else:
                    run_settings = _ClassicRunSettings(trt)
                self._engines[name] = _Engine(engine, profiles, kinds[True], kinds[False], len(plan), sha256,
                                              run_settings)

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device, cuda_graphs: bool = True) -> TensorRTBackend:
        """The artifact folder's engines, refused unless built by the installed flavour and version
        of TensorRT for this GPU's compute capability."""
        try:
            records = [c.engine for c in read_manifest(folder).components.values()]  # manifest records
            flavours = {record.flavour for record in records if record.built}
        except ManifestError as exc:
            raise BackendUnavailable(str(exc)) from exc
        flavour = flavours.pop() if len(flavours) == 1 else TENSORRT.name  # none or mixed: load_manifest says why
        trt = _import_tensorrt(flavour)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable(f"{get_flavour(flavour).title} needs a CUDA GPU, and this machine has none "
                                     f"({device} asked)")
        props = torch.cuda.get_device_properties(device)
        try:
            manifest = load_manifest(folder, engines=True, flavour=flavour, tensorrt_version=trt.__version__,
                                     compute_capability=(props.major, props.minor))
        except ManifestError as exc:
            raise BackendUnavailable(str(exc)) from exc
        engine_files = {}
        for name, component in manifest.components.items():
            built = component.engine  # a manifest record, not a TensorRT engine
            engine_files[name] = (folder / built.file, component.profiles)
        cache_folder = cache_dir(f"tensorrt-rtx-{trt.__version__}", folder) if flavour == TENSORRT_RTX.name else None
        return cls(engine_files, device, cuda_graphs, flavour=flavour, cache_folder=cache_folder)

    def verification_identity(self) -> dict:
        """What a first-use check verdict holds for: these engines, this GPU and driver, this TensorRT."""
        return {
            "flavour": self.flavour.name,
            "version": self._trt.__version__,
            "gpu": self.gpu,
            "engines": {name: state.sha256 for name, state in self._engines.items()},
        }

    def on_stream(self):
        return self._stream.scope()

    # -- launches -------------------------------------------------------------------------------

    def _check_inputs(self, component: str, state: _Engine, inputs: Tensors) -> Tensors:
        missing = [n for n in state.inputs if n not in inputs]
        if missing:
            raise ValueError(f"{component} needs inputs {', '.join(missing)}")
        checked = {}
        for name, dtype in state.inputs.items():
            tensor = inputs[name]
            if tensor.dtype != dtype:
                raise TypeError(f"{component} input {name} is {tensor.dtype}, the engine takes {dtype}")
            if tensor.device != self.device:
                raise ValueError(f"{component} input {name} is on {tensor.device}, the engine runs on {self.device}")
            checked[name] = tensor.contiguous()
        return checked

    def _new_launch(self, component: str, state: _Engine, shapes: dict[str, tuple[int, ...]], profile: int) -> _Launch:
        context = state.run_settings.create_context(state.engine)
        if context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {component} (see its log above)")
        try:  # the bindings raise where the C++ call returns false
            accepted = context.set_optimization_profile_async(profile, self._stream.stream.cuda_stream)
        except RuntimeError as exc:
            raise RuntimeError(f"TensorRT refused optimisation profile {profile} of {component}: {exc}") from exc
        if not accepted:
            raise RuntimeError(f"TensorRT refused optimisation profile {profile} of {component}")
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise ValueError(f"TensorRT refused {component} input {name} of shape {shape} (profile {profile})")
        scratch_bytes = int(context.update_device_memory_size_for_shapes())
        if scratch_bytes == 0 and state.engine.get_device_memory_size_for_profile_v2(profile) > 0:
            raise RuntimeError(f"TensorRT could not size the scratch memory of {component} at {shapes}")
        outputs = {}
        for name, dtype in state.outputs.items():
            shape = tuple(context.get_tensor_shape(name))
            if any(s < 0 for s in shape):
                raise RuntimeError(f"TensorRT could not infer the shape of {component} output {name} at {shapes}")
            with torch.inference_mode(False):  # kept across calls, whichever mode the first call ran in
                outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self._address(context, component, name, outputs[name])
        return _Launch(context=context, outputs=outputs, scratch_bytes=scratch_bytes)

    @staticmethod
    def _address(context, component: str, name: str, tensor: torch.Tensor) -> None:
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"TensorRT refused the address of {component} tensor {name}")

    def _launch(self, component: str, state: _Engine, shapes: dict[str, tuple[int, ...]]) -> _Launch:
        key = tuple(shapes.items())
        launch = state.launches.get(key)
        if launch is not None:
            state.launches.move_to_end(key)
            return launch
        profile = select_profile(state.profiles, shapes)
        if profile is None:
            raise ValueError(f"{component} shapes {shapes} are outside every profile of its engine")
        if len(state.launches) >= MAX_LAUNCHES:
            # The dropped context or graph may still be running on the stream: wait before freeing.
            self._stream.stream.synchronize()
            _, dropped = state.launches.popitem(last=False)
            logger.debug("dropped the %s launch at %s (more than %d shapes)", component, key, MAX_LAUNCHES)
            del dropped
        launch = state.launches[key] = self._new_launch(component, state, shapes, profile)
        return launch

    def _bind_scratch(self, launch: _Launch) -> None:
        if self._scratch.numel() < launch.scratch_bytes:
            self._scratch = torch.empty(launch.scratch_bytes, dtype=torch.uint8, device=self.device)
        address = self._scratch.data_ptr()
        if launch.bound_scratch != address:
            launch.context.set_device_memory(address, self._scratch.numel())
            launch.bound_scratch = address
            launch.graph, launch.runs = None, 1  # a graph records the old address: capture again

    def _execute(self, component: str, launch: _Launch) -> None:
        if not launch.context.execute_async_v3(self._stream.stream.cuda_stream):
            raise RuntimeError(f"TensorRT could not run {component} (see TensorRT's log above)")

    def run(self, component: str, inputs: Tensors) -> Tensors:
        state = self._engines[component]
        with self._stream.scope():
            inputs = self._check_inputs(component, state, inputs)
            launch = self._launch(component, state, {n: tuple(t.shape) for n, t in inputs.items()})
            launch.runs += 1
            self._bind_scratch(launch)
            if launch.graph is not None:
                for name, tensor in inputs.items():
                    launch.static_inputs[name].copy_(tensor)
                launch.graph.replay()
                return launch.outputs
            if self._cuda_graphs and launch.runs >= 2 and not launch.capture_failed and not state.run_settings.capturable(
                    launch.context, self._stream.stream.cuda_stream):
                launch.capture_failed = True
                logger.info("%s at %s cannot be captured in a CUDA graph (TensorRT-RTX says so): plain launches",
                            component, tuple(inputs[n].shape for n in inputs))
            if self._cuda_graphs and launch.runs >= 2 and not launch.capture_failed:
                if launch.static_inputs is None:
                    with torch.inference_mode(False):  # copied into on every replay, in either mode
                        launch.static_inputs = {name: torch.empty_like(t) for name, t in inputs.items()}
                for name, tensor in inputs.items():
                    launch.static_inputs[name].copy_(tensor)
                inputs = launch.static_inputs
            for name, tensor in inputs.items():
                self._address(launch.context, component, name, tensor)
            self._execute(component, launch)  # also flushes TensorRT's deferred updates before a capture
            if not launch.cache_saved:  # TensorRT-RTX compiled this shape's kernels: keep them for the next load
                state.run_settings.save_cache()
                launch.cache_saved = True
            if inputs is launch.static_inputs:
                self._capture(component, launch)
            return launch.outputs

    def _capture(self, component: str, launch: _Launch) -> None:
        """Record the launch (bound to its static inputs) on the backend's stream.

        After a failure no launch of this backend captures again: an engine that cannot be captured
        once will not be at other shapes, and each attempt costs a plain launch's worth of setup.
        """
        graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
        ended = False
        try:
            # thread_local: other threads of the host application may keep calling CUDA meanwhile.
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                captured = launch.context.execute_async_v3(self._stream.stream.cuda_stream)
            finally:
                graph.capture_end()
                ended = True
            if not captured:
                raise RuntimeError("execute_async_v3 returned False while capturing")
        except RuntimeError as exc:
            pending = _clear_pending_cuda_error(self.device)
            if not ended:  # an ended capture released its pool; the graph object owns what is left
                _release_capture_pool(self.device, pool)
            launch.capture_failed, self._cuda_graphs = True, False
            logger.warning(
                "CUDA graph capture of %s failed (%s%s); this backend keeps plain launches",
                component, str(exc).splitlines()[0], f"; cleared CUDA error: {pending}" if pending else "",
            )
            return
        launch.graph = graph

    def memory_bytes(self) -> int:
        """Engine files (about their weights), the shared scratch and every kept launch's buffers."""
        launches = sum(l.buffer_bytes() for s in self._engines.values() for l in s.launches.values())
        return sum(s.file_bytes for s in self._engines.values()) + self._scratch.numel() + launches

    def close(self) -> None:
        with torch.cuda.device(self.device):
            self._stream.stream.synchronize()
            for state in self._engines.values():
                state.launches.clear()
            self._engines.clear()
            self._keep_alive = None
            self._scratch = torch.empty(0, dtype=torch.uint8, device=self.device)


def _open_engines(request: OpenRequest) -> Backend:
    return TensorRTBackend.from_folder(request.folder, request.device)  # the folder's engines, all of them


register(BackendSpec("tensorrt", "TensorRT 10/11 or TensorRT-RTX (the trt, trt11 or rtx extra) and a CUDA GPU; "
                     "the folder's engines, built for this GPU", ("cuda",), _open_engines))
