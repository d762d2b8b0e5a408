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
  the profiles is a build error, never a guess. TensorRT keeps one logger per process, so the
  process has one (``tensorrt_rtx_logger``) that hands each line to the build on the thread that
  logged it: a runtime or another build in the same process does not take a build's figures.

TensorRT-RTX objects are held only in names the API test knows (``builder``, ``network``,
``parser``, ``config``, ``optimization_profile``): ``tests/test_tensorrt_api.py`` checks every
name used on them against the installed ``tensorrt_rtx`` module.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

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


_PROCESS_LOGS: dict[ModuleType, Any] = {}  # by TensorRT-RTX module: one per process
_PROCESS_LOGS_LOCK = threading.Lock()


class _Listening(threading.local):
    """The build collecting what TensorRT-RTX logs on this thread (None: nobody is)."""

    lines: list[str] | None = None
    warned: frozenset[str] | set[str] = frozenset()


def tensorrt_rtx_logger(trt: ModuleType) -> Any:
    """The one logger this process gives TensorRT-RTX (builders, parsers, runtimes alike).

    TensorRT documents a single logger per process and warns that it ignores a different one given
    later (TensorRT-RTX 1.7.1 without a GPU still hands a builder's lines to that builder's own), so
    where a build's lines (its memory figures) go must not depend on whose object came first: every
    object gets this logger, and each message goes to the build listening on the thread that logs it
    (``_collecting``), so builds in several threads, or beside a runtime, each get their own lines.
    Errors, and warnings (each distinct one once per build: int8 graphs repeat one per conv), also go
    to our log."""
    with _PROCESS_LOGS_LOCK:
        if trt not in _PROCESS_LOGS:
            _PROCESS_LOGS[trt] = _process_log(trt)
        return _PROCESS_LOGS[trt]


def _process_log(trt: ModuleType) -> Any:
    class ProcessLog(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.listening = _Listening()

        def log(self, severity, msg):
            lines = self.listening.lines
            if lines is not None:
                lines.append(msg)
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                logger.error("TensorRT-RTX: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING and msg not in self.listening.warned:
                if lines is not None:
                    self.listening.warned.add(msg)
                logger.warning("TensorRT-RTX: %s", msg)

    return ProcessLog()


@contextmanager
def _collecting(log) -> Iterator[list[str]]:
    """The lines TensorRT-RTX logs on this thread while inside: one build's."""
    lines: list[str] = []
    log.listening.lines, log.listening.warned = lines, set()
    try:
        yield lines
    finally:
        log.listening.lines, log.listening.warned = None, frozenset()


def memory_figures(lines: list[str], num_profiles: int, component: str) -> dict:
    """The builder's activation memory per profile and weights memory, from its log lines."""
    activations = [int(m.group(1)) for line in lines if (m := _ACTIVATION.search(line))]
    weights = [int(m.group(1)) for line in lines if (m := _WEIGHTS.search(line))]
    if not activations and not weights:
        raise EngineBuildError(
            f"TensorRT-RTX logged no memory figures for {component} to this build ({len(lines)} lines): a logger "
            "given to TensorRT-RTX earlier in this process may be receiving them (it keeps one per process; give "
            "every TensorRT-RTX object engines.tensorrt_rtx_build.tensorrt_rtx_logger), or this TensorRT-RTX logs "
            "its memory differently from the version this toolkit was written for"
        )
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

    log = tensorrt_rtx_logger(trt)
    monitor = progress_monitor(trt, report)
    start = time.perf_counter()
    # the parser and builder call back into Python (log) throughout the block
    with _collecting(log) as lines, cancel_on_ctrl_c(monitor):
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
        errors = "\n".join(line for line in lines if "error" in line.lower())[-2000:]
        raise EngineBuildError(f"TensorRT-RTX could not build {component}:\n{errors or '(no error logged)'}")
    if any(_RUNTIME_ALLOCATION in line for line in lines):  # the flag above should rule it out
        raise EngineBuildError(f"TensorRT-RTX built {component} with run-time tensor allocation, which the runtime "
                               "cannot give scratch memory or capture; build a smaller range (--max-px, --max-batch)")
    engine_bytes = bytes(serialized)
    seconds = time.perf_counter() - start
    facts = memory_figures(lines, len(profiles), component)
    with atomic_output(engine_path) as partial:
        partial.write_bytes(engine_bytes)
    return {
        "build_seconds": round(seconds, 1),
        "tf32": options.tf32,
        "engine_bytes": len(engine_bytes),
        **facts,
    }
