"""TensorRT backend: the artifact folder's engines, run with ``execute_async_v3`` on torch memory.

- The manifest is checked against the running TensorRT version and GPU before any engine loads.
- The profile is selected per call: the smallest profile covering the input shapes.
- Contexts are created with user-managed scratch memory. All engines share one scratch buffer,
  grown to the largest size the shapes actually run need (not the profile maximum), because the
  components run one after another.
- Output buffers are kept per (component, shapes) and reused. An output is valid until the same
  component runs again at the same shapes; the ``Upscaler`` consumes each output before that.
- Repeated shapes replay a CUDA graph of the engine launch, with the inputs copied into
  static buffers. Where capture fails, the shapes fall back to plain launches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines.manifest import ManifestError, load_manifest
from engines.profiles import select_profile

from .backends import Backend, BackendUnavailable, Tensors


@dataclass
class _Launch:
    """Everything fixed for one component at one set of input shapes."""

    profile: int
    outputs: Tensors
    scratch_bytes: int
    static_inputs: Tensors | None = None
    graph: torch.cuda.CUDAGraph | None = None
    graph_scratch: int = 0  # the scratch address baked into ``graph``
    runs: int = 0


@dataclass
class _Engine:
    engine: object
    context: object
    profiles: list
    inputs: list[str]
    outputs: list[str]
    active_profile: int = -1
    launches: dict[tuple, _Launch] = field(default_factory=dict)


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.int32: torch.int32}
    return table[dtype]


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, folder: Path, device: torch.device, cuda_graphs: bool = True):
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailable("TensorRT is not installed (pip install -e '.[trt]')") from exc
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable(f"TensorRT needs a CUDA device, got {device}")
        props = torch.cuda.get_device_properties(device)
        try:
            manifest = load_manifest(
                folder, engines=True, tensorrt_version=trt.__version__, compute_capability=(props.major, props.minor)
            )
        except ManifestError as exc:
            raise BackendUnavailable(str(exc)) from exc
        self._trt = trt
        self.device = device
        self._cuda_graphs = cuda_graphs
        self._scratch = torch.empty(0, dtype=torch.uint8, device=device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines: dict[str, _Engine] = {}
        self._weights_bytes = 0
        for name, record in manifest.components.items():
            engine = runtime.deserialize_cuda_engine((folder / record.engine.file).read_bytes())
            if engine is None:
                raise BackendUnavailable(f"TensorRT could not load {record.engine.file}; rebuild with: {manifest.rebuild_command}")
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            tensors = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            is_input = {t: engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT for t in tensors}
            self._engines[name] = _Engine(
                engine=engine,
                context=context,
                profiles=record.profiles,
                inputs=[t for t in tensors if is_input[t]],
                outputs=[t for t in tensors if not is_input[t]],
            )
            self._weights_bytes += (folder / record.engine.file).stat().st_size

    def _prepare(self, state: _Engine, shapes: dict[str, tuple[int, ...]], stream: int) -> _Launch:
        profile = select_profile(state.profiles, shapes)
        if profile is None:
            raise ValueError(f"shapes {shapes} are outside every profile of this engine")
        context = state.context
        if state.active_profile != profile:
            context.set_optimization_profile_async(profile, stream)
            state.active_profile = profile
        for name, shape in shapes.items():
            context.set_input_shape(name, shape)
        outputs = {
            name: torch.empty(
                tuple(context.get_tensor_shape(name)),
                dtype=_torch_dtype(self._trt, state.engine.get_tensor_dtype(name)),
                device=self.device,
            )
            for name in state.outputs
        }
        return _Launch(profile=profile, outputs=outputs, scratch_bytes=int(context.update_device_memory_size_for_shapes()))

    def _bind(self, state: _Engine, launch: _Launch, inputs: Tensors, stream: int) -> None:
        context = state.context
        if state.active_profile != launch.profile:
            context.set_optimization_profile_async(launch.profile, stream)
            state.active_profile = launch.profile
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in launch.outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if self._scratch.numel() < launch.scratch_bytes:
            self._scratch = torch.empty(launch.scratch_bytes, dtype=torch.uint8, device=self.device)
        context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())

    def _execute(self, state: _Engine, stream: int) -> None:
        if not state.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execution failed (see TensorRT's log above)")

    def run(self, component: str, inputs: Tensors) -> Tensors:
        state = self._engines[component]
        inputs = {name: inputs[name].contiguous() for name in state.inputs}
        shapes = {name: tuple(t.shape) for name, t in inputs.items()}
        stream = torch.cuda.current_stream(self.device).cuda_stream
        key = tuple(shapes.items())
        launch = state.launches.get(key)
        if launch is None:
            launch = state.launches[key] = self._prepare(state, shapes, stream)
        launch.runs += 1
        if launch.graph is not None and launch.graph_scratch != self._scratch.data_ptr():
            launch.graph, launch.runs = None, 1  # the shared scratch moved: record again
        if launch.graph is not None:
            for name, tensor in inputs.items():
                launch.static_inputs[name].copy_(tensor)
            launch.graph.replay()
            return launch.outputs
        self._bind(state, launch, inputs, stream)
        self._execute(state, stream)
        if self._cuda_graphs and launch.runs == 2:
            self._capture(state, launch, inputs)
        return launch.outputs

    def _capture(self, state: _Engine, launch: _Launch, inputs: Tensors) -> None:
        """Record the launch at these shapes once they repeat; plain launches if TensorRT refuses."""
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        capture_stream = torch.cuda.Stream(self.device)
        capture_stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(capture_stream):
                self._bind(state, launch, static, capture_stream.cuda_stream)
                self._execute(state, capture_stream.cuda_stream)  # flush deferred updates before capture
                with torch.cuda.graph(graph, stream=capture_stream):
                    self._execute(state, capture_stream.cuda_stream)
        except RuntimeError:
            return
        finally:
            torch.cuda.current_stream(self.device).wait_stream(capture_stream)
        launch.static_inputs, launch.graph, launch.graph_scratch = static, graph, self._scratch.data_ptr()

    def memory_bytes(self) -> int:
        outputs = sum(
            t.numel() * t.element_size() for s in self._engines.values() for l in s.launches.values() for t in l.outputs.values()
        )
        return self._weights_bytes + self._scratch.numel() + outputs

    def close(self) -> None:
        self._engines.clear()
        self._scratch = torch.empty(0, dtype=torch.uint8, device=self.device)
