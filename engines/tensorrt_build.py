"""TensorRT engine build through Polygraphy: strongly typed, profiled, with a timing cache.

The only build module that imports TensorRT, and only when a build is asked for. Precision lives
in the ONNX graph (fp16/bf16 weights and casts), so no precision builder flags are ever set:
TensorRT 10 gets the STRONGLY_TYPED network flag, TensorRT 11 is always strongly typed.

Two builder settings are decided here rather than left to defaults:
- TF32 is off unless asked for (``BuildOptions.tf32``): where a graph says fp32 (an fp32 VAE, the
  float islands of fp8 graphs) it means fp32, and the accuracy gate's fp32 limits assume it.
  TensorRT enables TF32 by default and Polygraphy clears it by default; we say which in the
  manifest either way.
- The preview feature RUNTIME_ACTIVATION_RESIZE_10_10 (TensorRT >= 10.10), so the runtime's
  ``update_device_memory_size_for_shapes()`` sizes scratch for the shapes actually run instead of
  each profile's maximum.

TensorRT objects are held in variables named ``builder``, ``network``, ``parser``, ``config``,
``engine`` and ``timing_cache``: ``tests/test_tensorrt_api.py`` checks every name used on them
against the real TensorRT 10 and 11 bindings.
"""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import FlowUpscalerError
from .files import atomic_output
from .profiles import Profile

# Phrases of TensorRT build errors that mean the build ran out of memory (the tactic search
# reports "could not find any implementation" when every tactic failed to allocate).
_OUT_OF_MEMORY_PHRASES = (
    "could not find any implementation",
    "insufficient memory",
    "out of memory",
    "outofmemory",
    "cudaerrormemoryallocation",
    "requested amount of gpu memory",
)


class EngineBuildError(FlowUpscalerError, RuntimeError):
    """A TensorRT build that failed, with TensorRT's own error lines attached."""


# Lets update_device_memory_size_for_shapes() shrink activation memory to the shapes set.
ACTIVATION_RESIZE_FEATURE = "RUNTIME_ACTIVATION_RESIZE_10_10"


@dataclass(frozen=True)
class BuildOptions:
    optimization_level: int = 3
    workspace_bytes: int | None = None
    tf32: bool = False  # let fp32 layers use TF32 (TensorRT's default is on; ours is off, see above)

    def to_dict(self) -> dict:
        return {
            "optimization_level": self.optimization_level,
            "workspace_bytes": self.workspace_bytes,
            "tf32": self.tf32,
        }


@dataclass(frozen=True)
class LocalGPU:
    name: str
    compute_capability: tuple[int, int]


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return getattr(tensorrt, "__version__", None)


def local_gpu() -> LocalGPU | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return LocalGPU(props.name, (props.major, props.minor))


def build_blocker(target_capability: tuple[int, int], trt_version: str | None, gpu: LocalGPU | None) -> str | None:
    """Why engines for ``target_capability`` cannot be built here (None if they can).

    Engines run only on the compute capability they were built on, so a build on another GPU
    would produce engines the target cannot load.
    """
    if trt_version is None:
        return "TensorRT is not installed (pip install -e '.[trt]' on the target machine)"
    if gpu is None:
        return "no CUDA GPU on this machine"
    if gpu.compute_capability != target_capability:
        have = "%d.%d" % gpu.compute_capability
        want = "%d.%d" % target_capability
        return f"this machine's GPU ({gpu.name}, compute capability {have}) is not the target's ({want})"
    return None


def _network_loader(trt, onnx_path: Path):
    from polygraphy.backend.trt import NetworkFromOnnxPath

    major = int(trt.__version__.split(".")[0])
    has_flag = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    return NetworkFromOnnxPath(str(onnx_path), strongly_typed=True if major < 11 and has_flag else None)


def progress_monitor(trt, report: Callable[[str], None]):
    class Progress(trt.IProgressMonitor):
        """Prints TensorRT's top-level build phases with the time since the build began; cancels
        the build once ``interrupted`` is set (``cancel_on_ctrl_c``)."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._start = time.perf_counter()
            self.interrupted = False

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                report(f"[{time.perf_counter() - self._start:6.1f} s] {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return not self.interrupted  # False asks TensorRT to cancel the build

        def phase_finish(self, phase_name):
            pass

    return Progress()


@contextmanager
def cancel_on_ctrl_c(monitor) -> Iterator[None]:
    """Ctrl-C during a build cancels it, then raises KeyboardInterrupt.

    Python runs its SIGINT handler at the next Python code, which during a build is one of the
    builder's callbacks; the bindings swallow a KeyboardInterrupt raised there and the build would
    run to the end (seen with TensorRT-RTX 1.7). So during the build SIGINT only sets the
    monitor's flag, its ``step_complete`` answers False, and the interrupt is raised here after.
    """
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def interrupted(signum, frame):
        monitor.interrupted = True

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    except Exception:
        if monitor.interrupted:
            raise KeyboardInterrupt from None  # the cancelled build's own error is not the story
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if monitor.interrupted:
        raise KeyboardInterrupt


def _preview_features(trt) -> list:
    """The preview features we enable that this TensorRT has (older 10.x lack the resize one)."""
    feature = getattr(trt.PreviewFeature, ACTIVATION_RESIZE_FEATURE, None)
    return [feature] if feature is not None else []


def _polygraphy_profile(profile: Profile):
    from polygraphy.backend.trt import Profile as PolygraphyProfile

    converted = PolygraphyProfile()
    for name in profile.min:
        converted.add(name, min=profile.min[name], opt=profile.opt[name], max=profile.max[name])
    return converted


def _explain_failure(exc: Exception, errors: str, component: str) -> EngineBuildError:
    lowered = errors.lower()
    detail = "\n".join(line for line in errors.splitlines() if "[E]" in line or "error" in line.lower())[-2000:]
    if any(phrase in lowered for phrase in _OUT_OF_MEMORY_PHRASES):
        return EngineBuildError(
            f"TensorRT ran out of GPU memory building {component}. Build with a smaller profile "
            "(--max-px, --max-batch) or a lower workspace limit (--workspace-gib), or free the GPU "
            f"of other processes.\nTensorRT said:\n{detail}"
        )
    return EngineBuildError(f"TensorRT could not build {component}: {exc}\n{detail}")


def build_engine(
    component: str,
    onnx_path: Path,
    profiles: list[Profile],
    options: BuildOptions,
    engine_path: Path,
    timing_cache_path: Path,
    report: Callable[[str], None] = print,
) -> dict:
    """Build one engine; write it and the updated timing cache atomically. Returns build facts."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork
    from polygraphy.logger import G_LOGGER

    network_loader = _network_loader(trt, onnx_path)
    limits = {trt.MemoryPoolType.WORKSPACE: options.workspace_bytes} if options.workspace_bytes else None
    preview_features = _preview_features(trt)
    monitor = progress_monitor(trt, report)
    create_config = CreateConfig(
        tf32=options.tf32,
        profiles=[_polygraphy_profile(p) for p in profiles],
        builder_optimization_level=options.optimization_level,
        memory_pool_limits=limits,
        preview_features=preview_features,
        load_timing_cache=str(timing_cache_path) if timing_cache_path.exists() else None,
        progress_monitor=monitor,
    )
    with tempfile.TemporaryDirectory() as scratch:
        log_path = Path(scratch) / "tensorrt.log"
        G_LOGGER.log_file = str(log_path)
        start = time.perf_counter()
        try:
            builder, network, parser = network_loader()
            config = create_config(builder, network)
            with cancel_on_ctrl_c(monitor):
                engine_bytes = EngineBytesFromNetwork((builder, network, parser), config)()
            timing_cache = config.get_timing_cache()
            cache_bytes = bytes(timing_cache.serialize()) if timing_cache is not None else None
        except Exception as exc:
            raise _explain_failure(exc, log_path.read_text(errors="replace") if log_path.exists() else "", component) from exc
        finally:
            G_LOGGER.log_file = None
    seconds = time.perf_counter() - start

    with atomic_output(engine_path) as partial:
        partial.write_bytes(bytes(engine_bytes))
    if cache_bytes:
        with atomic_output(timing_cache_path) as partial:
            partial.write_bytes(cache_bytes)
    return {
        "build_seconds": round(seconds, 1),
        "tf32": options.tf32,
        "preview_features": [ACTIVATION_RESIZE_FEATURE] if preview_features else [],
        "engine_bytes": len(engine_bytes),
        **_engine_memory(engine_bytes, len(profiles)),
    }


def _engine_memory(engine_bytes, num_profiles: int) -> dict:
    """Activation (scratch) memory TensorRT says each profile needs at its maximum shapes."""
    from polygraphy.backend.trt import EngineFromBytes

    engine = EngineFromBytes(engine_bytes)()
    if not hasattr(engine, "get_device_memory_size_for_profile_v2"):
        return {}
    return {
        "activation_bytes_per_profile": [
            int(engine.get_device_memory_size_for_profile_v2(i)) for i in range(num_profiles)
        ]
    }
