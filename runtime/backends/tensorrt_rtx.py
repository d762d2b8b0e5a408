"""What running a TensorRT-RTX engine needs beyond TensorRT 10/11's calls, in one place.

TensorRT-RTX compiles an engine's kernels just in time on the user's GPU. Three settings of its
per-engine runtime configuration are chosen here, on purpose:

- Dynamic-shape kernels: EAGER. The default, LAZY, first runs generic kernels and swaps in
  shape-specialised ones compiled in the background. The TensorRT backend captures a CUDA graph
  on the second run at each shape; under LAZY that graph would freeze the generic kernels for
  good. EAGER compiles the specialised kernels during the first run at a shape (a one-off cost,
  kept in the runtime cache), so what the graph records is the fast path.
- CUDA graphs: DISABLED in TensorRT-RTX. The backend's own capture (torch CUDA graphs, one per
  launch, with its fall-back when a capture fails) serves both flavours; two mechanisms stacked
  on one launch would capture twice.
- Runtime cache: compiled kernels are saved to, and loaded from, a file in the user cache folder
  (``runtime.cache``), never in the artifact folder. Its name is a hash of the engine's sha256,
  the GPU's name and compute capability, the driver version and the TensorRT-RTX version, so
  another GPU model, driver or version never reuses it. Written atomically, whenever a new shape
  has compiled kernels.

Engines are also asked TensorRT-RTX's own validity question (``get_engine_validity`` on the plan's
header) before deserialising, so a plan of another version or compute capability is refused with
the reason instead of failing inside TensorRT-RTX. Without a usable driver TensorRT-RTX still makes a
runtime but calls every plan invalid with no diagnostic: that refusal points at the driver, since a
rebuild cannot help.

TensorRT-RTX objects are held only in names the API test knows (``runtime``, ``engine``,
``runtime_config``, ``runtime_cache``): ``tests/test_tensorrt_api.py`` checks every name used on
them against the installed ``tensorrt_rtx`` module.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engines.files import atomic_output
from engines.manifest import content_key

logger = logging.getLogger(__name__)


def import_module():
    import tensorrt_rtx as trt

    return trt


def plan_problem(trt, runtime, plan: bytes) -> str | None:
    """Why TensorRT-RTX says this plan cannot run here (None when it can), from the plan's header: a
    reason a rebuild for this GPU and version fixes. Where only the driver or CUDA is at fault (and
    where TensorRT-RTX could not read the GPU at all, which it reports as invalid with no reason),
    rebuilding cannot help, so that is raised as ``BackendUnavailable`` saying to check the driver."""
    size = runtime.engine_header_size
    if len(plan) < size:
        return f"the file is {len(plan)} bytes, shorter than an engine header ({size})"
    validity, diagnostics = runtime.get_engine_validity(plan[:size])
    if validity == trt.EngineValidity.SUBOPTIMAL:
        logger.warning("TensorRT-RTX says this engine runs here but suboptimally (diagnostics %d); rebuilding it "
                       "for this GPU and driver may be faster", int(diagnostics))
    if validity != trt.EngineValidity.INVALID:
        return None
    reasons = {
        trt.EngineInvalidityDiagnostics.VERSION_MISMATCH: "built by another TensorRT-RTX version",
        trt.EngineInvalidityDiagnostics.UNSUPPORTED_CC: "built for another compute capability",
        trt.EngineInvalidityDiagnostics.OLD_CUDA_DRIVER: "the NVIDIA driver is too old",
        trt.EngineInvalidityDiagnostics.OLD_CUDA_RUNTIME: "the CUDA runtime is too old",
        trt.EngineInvalidityDiagnostics.INSUFFICIENT_GPU_MEMORY: "not enough GPU memory",
        trt.EngineInvalidityDiagnostics.MALFORMED_ENGINE: "the file is not a valid engine",
        trt.EngineInvalidityDiagnostics.CUDA_ERROR: "a CUDA error while checking it",
    }
    found = [why for flag, why in reasons.items() if int(diagnostics) & int(flag)]
    driver = (trt.EngineInvalidityDiagnostics.OLD_CUDA_DRIVER, trt.EngineInvalidityDiagnostics.OLD_CUDA_RUNTIME,
              trt.EngineInvalidityDiagnostics.CUDA_ERROR)
    if int(diagnostics) & ~sum(int(flag) for flag in driver) == 0:
        raise _driver_problem(trt, "; ".join(found) or "it calls the engine invalid without a reason, which is "
                             "what it does when it cannot query the GPU (its CUDA error is logged above)")
    return "; ".join(found) or f"TensorRT-RTX says invalid (diagnostics {int(diagnostics)})"


def _driver_problem(trt, why: str) -> Exception:
    """The refusal for an engine that the driver or CUDA, not the build, keeps from running."""
    from importlib.metadata import packages_distributions

    from .base import BackendUnavailable

    package = ", ".join(packages_distributions().get(trt.__name__, [])) or trt.__name__
    return BackendUnavailable(
        f"TensorRT-RTX {trt.__version__} cannot run its engines on this GPU: {why}; check that the NVIDIA driver "
        f"is installed and new enough for the CUDA version this TensorRT-RTX is built for ({package}), or install "
        "the TensorRT-RTX build for the CUDA version the driver supports (rebuilding the folder does not help)")


def runtime_cache_file(cache_folder: Path, engine_sha256: str, gpu: dict, trt_version: str) -> Path:
    """Where one engine's compiled kernels are kept for this GPU, driver and TensorRT-RTX version."""
    key = content_key(engine_sha256, gpu, trt_version)
    return cache_folder / f"{engine_sha256[:16]}.{key}.cache"


class RtxRunSettings:
    """One engine's runtime configuration (contexts are created from it) and its runtime cache file."""

    def __init__(self, trt, engine, cache_path: Path | None):
        self._trt = trt
        self.cache_path = cache_path
        self.runtime_config = engine.create_runtime_config()
        self.runtime_config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.runtime_config.dynamic_shapes_kernel_specialization_strategy = (
            trt.DynamicShapesKernelSpecializationStrategy.EAGER)
        self.runtime_config.cuda_graph_strategy = trt.CudaGraphStrategy.DISABLED
        self.runtime_cache = self.runtime_config.create_runtime_cache()
        self._saved_bytes = 0
        if cache_path is not None and cache_path.is_file():
            self._load(cache_path)
        if not self.runtime_config.set_runtime_cache(self.runtime_cache):
            logger.warning("TensorRT-RTX refused its runtime cache: kernels compile at every load")
            self.cache_path = None

    def _load(self, cache_path: Path) -> None:
        """Load the kept kernels; a damaged or foreign file only costs compile time (it is replaced)."""
        try:
            data = cache_path.read_bytes()
            loaded = self.runtime_cache.deserialize(data)
        except (OSError, RuntimeError, TypeError) as exc:
            loaded, data = False, f"{exc}"
        if loaded:
            self._saved_bytes = len(data)
            logger.info("TensorRT-RTX runtime cache loaded from %s (%d bytes)", cache_path, len(data))
            return
        logger.warning("TensorRT-RTX did not accept the runtime cache %s%s; kernels compile again", cache_path,
                       f" ({data})" if isinstance(data, str) else "")
        self.runtime_cache = self.runtime_config.create_runtime_cache()

    def create_context(self, engine):
        return engine.create_execution_context(self.runtime_config)

    @staticmethod
    def capturable(context, stream: int) -> bool:
        """Whether TensorRT-RTX says this context's launch can be recorded in a CUDA graph."""
        return bool(context.is_stream_capturable(stream))

    def save_cache(self) -> None:
        """Write the runtime cache if it grew since it was loaded or last saved (a new shape compiled)."""
        if self.cache_path is None:
            return
        try:
            data = bytes(self.runtime_cache.serialize())
        except (RuntimeError, TypeError) as exc:
            logger.warning("could not serialise the TensorRT-RTX runtime cache (%s)", exc)
            return
        if len(data) <= self._saved_bytes:
            return
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(self.cache_path, shared=True) as partial:
                partial.write_bytes(data)
        except OSError as exc:  # a read-only home only costs compile time at the next load
            logger.warning("could not write the TensorRT-RTX runtime cache %s (%s)", self.cache_path, exc)
            return
        self._saved_bytes = len(data)
        logger.info("TensorRT-RTX runtime cache saved to %s (%d bytes)", self.cache_path, len(data))
