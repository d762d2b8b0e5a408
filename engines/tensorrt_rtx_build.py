"""TensorRT-RTX engine build, ahead of time: for a named compute capability, on any machine.

The TensorRT-RTX API directly, not Polygraphy: Polygraphy chooses between TensorRT and
TensorRT-RTX by an environment variable read once at import (``POLYGRAPHY_USE_TENSORRT_RTX``), so
one process (a test run, an app) could not use both flavours, and its ``CreateConfigRTX`` leaves
TF32 on. The build needs a handful of builder calls, which are these.

Decided here rather than left to defaults:
- Strongly typed: TensorRT-RTX networks always are; precision lives in the ONNX graph.
- TF32 off unless asked for: TensorRT-RTX 1.7's builder sets the TF32 flag by default, so an fp32
  graph (an fp32 VAE, the float islands of fp8 graphs) would silently run in TF32. The manifest
  records the choice.
- One compute capability per engine, the target's; the runtime refuses any other GPU.
- User allocation required (``REQUIRE_USER_ALLOCATION``): without it, a profile too large for
  static allocation silently switches to run-time tensor allocation: the builder then reports a
  tiny activation figure (8 MB for a profile that needs 17 GB), the engine allocates during
  ``execute_async_v3`` outside the runtime's scratch buffer, and CUDA graph capture fails. With
  it, the figure is the real one and every launch runs in the scratch memory the runtime gives.
- Memory as the builder reports it: it logs "Total Activation Memory: N bytes" once per
  optimisation profile, in profile order, and "Total Weights Memory". Without a GPU the engine
  cannot be deserialised to ask it, so those lines are the figures; a count that does not match
  the profiles is a build error, never a guess.

TensorRT-RTX objects are held only in names the API test knows (``builder``, ``network``,
``parser``, ``config``, ``optimization_profile``): ``tests/test_tensorrt_api.py`` checks every
name used on them against the installed ``tensorrt_rtx`` module.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from .files import atomic_output
from .profiles import Profile
from .tensorrt_build import BuildOptions, EngineBuildError, cancel_on_ctrl_c, progress_monitor

logger = logging.getLogger(__name__)

_ACTIVATION = re.compile(r"Total Activation Memory: (\d+) bytes")
_WEIGHTS = re.compile(r"Total Weights Memory: (\d+) bytes")
_RUNTIME_ALLOCATION = "Runtime Tensor Allocation"


def _compute_capability(trt, capability: tuple[int, int]):
    values = {
        (7, 5): trt.ComputeCapability.SM75,
        (8, 0): trt.ComputeCapability.SM80,
        (8, 6): trt.ComputeCapability.SM86,
        (8, 9): trt.ComputeCapability.SM89,
        (12, 0): trt.ComputeCapability.SM120,
        (12, 1): trt.ComputeCapability.SM121,
    }
    if capability not in values:
        raise EngineBuildError(
            "TensorRT-RTX cannot build for compute capability %d.%d (it builds for %s)"
            % (*capability, ", ".join("%d.%d" % c for c in values))
        )
    return values[capability]


_BUILDER_LOGS: dict[object, object] = {}  # by TensorRT-RTX module: one per process


def _builder_log(trt):
    """The process's builder logger. TensorRT-RTX keeps the first logger it was given while any
    builder lives and ignores later ones (it warns so), so one logger serves every build and each
    build collects its lines through ``lines``, reset when the build starts."""
    if trt in _BUILDER_LOGS:
        log = _BUILDER_LOGS[trt]
        log.lines, log.warned = [], set()
        return log

    class BuilderLog(trt.ILogger):
        """Keeps the builder's messages (memory figures, errors); errors, and each distinct warning
        once (int8 graphs repeat one per conv), also go to our log."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.warned: set[str] = set()

        def log(self, severity, msg):
            self.lines.append(msg)
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                logger.error("TensorRT-RTX: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING and msg not in self.warned:
                self.warned.add(msg)
                logger.warning("TensorRT-RTX: %s", msg)

    _BUILDER_LOGS[trt] = BuilderLog()
    return _BUILDER_LOGS[trt]


def memory_figures(lines: list[str], num_profiles: int, component: str) -> dict:
    """The builder's activation memory per profile and weights memory, from its log lines."""
    activations = [int(m.group(1)) for line in lines if (m := _ACTIVATION.search(line))]
    weights = [int(m.group(1)) for line in lines if (m := _WEIGHTS.search(line))]
    if len(activations) != num_profiles or len(weights) != 1:
        raise EngineBuildError(
            f"TensorRT-RTX reported activation memory for {len(activations)} profiles of {component} "
            f"(built {num_profiles}) and {len(weights)} weights figures: this TensorRT-RTX logs its memory "
            "differently from the version this toolkit was written for; the engine's memory cannot be checked"
        )
    return {"activation_bytes_per_profile": activations, "weights_bytes": weights[0]}


def build_rtx_engine(
    component: str,
    onnx_path: Path,
    profiles: list[Profile],
    compute_capability: tuple[int, int],
    options: BuildOptions,
    engine_path: Path,
    report: Callable[[str], None] = print,
) -> dict:
    """Build one engine for ``compute_capability`` and write it atomically. Returns its build facts."""
    import tensorrt_rtx as trt

    log = _builder_log(trt)
    monitor = progress_monitor(trt, report)
    start = time.perf_counter()
    with cancel_on_ctrl_c(monitor):  # the parser and builder call back into Python (log) throughout
        builder = trt.Builder(log)
        network = builder.create_network(0)  # always strongly typed
        parser = trt.OnnxParser(network, log)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT-RTX could not parse the {component} graph {onnx_path}:\n{errors}")
        config = builder.create_builder_config()
        config.num_compute_capabilities = 1  # set before the capability itself (the API's order)
        if not config.set_compute_capability(_compute_capability(trt, compute_capability), 0):
            raise EngineBuildError("TensorRT-RTX refused compute capability %d.%d for %s" % (*compute_capability, component))
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
        if not options.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        config.builder_optimization_level = options.optimization_level
        if options.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
        config.progress_monitor = monitor
        for profile in profiles:
            optimization_profile = builder.create_optimization_profile()
            for name in profile.min:
                optimization_profile.set_shape(name, profile.min[name], profile.opt[name], profile.max[name])
            config.add_optimization_profile(optimization_profile)
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = "\n".join(line for line in log.lines if "error" in line.lower())[-2000:]
        raise EngineBuildError(f"TensorRT-RTX could not build {component}:\n{errors or '(no error logged)'}")
    if any(_RUNTIME_ALLOCATION in line for line in log.lines):  # the flag above should rule it out
        raise EngineBuildError(f"TensorRT-RTX built {component} with run-time tensor allocation, which the runtime "
                               "cannot give scratch memory or capture; build a smaller range (--max-px, --max-batch)")
    engine_bytes = bytes(serialized)
    seconds = time.perf_counter() - start
    facts = memory_figures(log.lines, len(profiles), component)
    with atomic_output(engine_path) as partial:
        partial.write_bytes(engine_bytes)
    return {
        "build_seconds": round(seconds, 1),
        "tf32": options.tf32,
        "engine_bytes": len(engine_bytes),
        **facts,
    }
