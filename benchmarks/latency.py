"""``python -m benchmarks.latency``: latency of each backend per component and per 2x pass.

Sizes are output image sides in pixels (1024 = latent 64 -> 128). Rows:
- ``cond_encoder`` at the pass's low-res latent (size/16), ``unet`` at its sample (size/8),
  ``vae_decoder`` decoding the output latent (size/8) in the folder's tiles;
- ``pipeline``: one 2x pass. For eager and compiled PyTorch (``eager-*``, ``compile``): encoder +
  unet + ``x0 = noise - v`` with noise drawn on the device, no runtime. For the runtime's backends
  (``onnxruntime*``, ``tensorrt``, ``torch*``): ``Upscaler.upscale(scale=2)``, once per ``--noise``
  mode, rows marked ``"through_runtime": true``: input checks, noise, the pass, hand-over;
- ``backend_pass`` (runtime backends): the backend's pass alone (noise drawn beforehand), so
  ``pipeline - backend_pass`` is the runtime's overhead, reported per backend and noise mode.

``eager-fp32`` is IEEE fp32 (TF32 off). ``first_call_ms`` is the first warm-up call: with compiled
backends it includes the compilation at that shape.

GPU timing uses CUDA events around each call after warm-up; CPU timing uses perf_counter. Each
row has FLOPs counted on the meta device, achieved TFLOP/s, the share of the peak and the speedup
over the baseline at the same component and size in the same run. GPU: the target preset's fp16
peak, baseline eager fp16. CPU: the bf16 matrix peak measured here (a 3x3 convolution, 384
channels, channels-last: what the U-Net is made of; the fp32 figure beside it), baseline ONNX
Runtime (the fp32 path). ``auto`` rows run what ``Upscaler.load`` chooses here and name it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from calib.quantize import FLOAT_PART
from engines.cli import int_in_range, run_cli
from engines.errors import FlowUpscalerError
from engines.manifest import CPU_INT8, load_manifest
from engines.targets import target_for_device
from engines.files import atomic_output, check_output_file
from runtime import InvalidArgumentError
from runtime.upscale_pass import PASS_COMPONENTS, timesteps, x0_from_velocity
from runtime.metrics import difference, percentile
from runtime.numerics import full_fp32
from runtime.tiling import decode_tile, decode_tiled, tile_overlap, tile_starts

from .flops import FlopCounter

# The runtime's backends as ``Upscaler`` runs them: (backend, options for Upscaler.load).
RUNTIME_BACKENDS = {
    "auto": ("auto", {}),
    "onnxruntime": ("onnxruntime", {}),
    "onnxruntime-int8": ("onnxruntime", {"precision": "int8"}),  # the folder's CPU graphs
    "onnxruntime-nhwc": ("onnxruntime", {}),  # CUDA provider with prefer_nhwc (see RuntimeRunner)
    "tensorrt": ("tensorrt", {}),
    "torch-fp16": ("torch", {"precision": "fp16"}),
    "torch": ("torch", {}),
    "torch-bf16": ("torch", {"precision": "bf16"}),
    "torch-bf16-compile": ("torch", {"precision": "bf16", "compile_mode": "default"}),
    "torch-fp16-compile": ("torch", {"precision": "fp16", "compile_mode": "max-autotune-no-cudagraphs"}),
    "torch-fp16-graphs": ("torch", {"precision": "fp16", "compile_mode": "reduce-overhead"}),
}
EAGER_DTYPES = {"eager-fp32": torch.float32, "eager-fp16": torch.float16, "eager-bf16": torch.bfloat16, "compile": torch.float16}
BACKENDS = (*EAGER_DTYPES, *RUNTIME_BACKENDS)
# What runs on the CPU: eager fp32, and the runtime's CPU paths (fp32, and bf16 on the matrix
# units). The runners skip the rest there (half-precision eager models, the torch backend's fp16
# modes, the CUDA provider's NHWC option, TensorRT) and say why.
CPU_BACKENDS = ("eager-fp32", "auto", "onnxruntime", "onnxruntime-int8", "torch", "torch-bf16", "torch-bf16-compile")
GPU_ONLY = set(BACKENDS) - set(CPU_BACKENDS)
COMPONENTS = ("cond_encoder", "unet", "vae_decoder", "pipeline", "backend_pass")
NOISE_MODES = ("device", "cpu")
BASELINES = {"cuda": "eager-fp16", "cpu": "onnxruntime"}
# The CPU peak probe: a U-Net-like 3x3 convolution, channels-last, batch 1.
PEAK_CONV = {"channels": 384, "side": 64, "kernel": 3}
PUBLISHED = {"size": 1024, "median_ms": 8.09, "gpu": "NVIDIA GeForce RTX 5090", "backend": "eager-fp16",
             "source": "MODEL.md section 4 (CTGMWorkshop benchmark, model in train mode)"}


class Skip(Exception):
    """A backend or row that cannot run here; the message is recorded in the output."""


class NothingMeasured(FlowUpscalerError, RuntimeError):
    """Every row was skipped here: a table of nothing is no result, so no file is written."""


def time_call(fn: Callable[[], object], device: torch.device, runs: int, warmup: int) -> tuple[list[float], float | None]:
    """Milliseconds per call, each measured alone (synchronised), after ``warmup`` calls; and the
    first warm-up call's milliseconds (compilation included), None without warm-up."""
    first = None
    for index in range(warmup):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index == 0:
            first = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times, first


def _latent_sides(size: int) -> tuple[int, int]:
    if size % 32:
        raise InvalidArgumentError(f"sizes must be multiples of 32 px (got {size})")
    return size // 16, size // 8


class Models:
    """The eager fp32 models of an artifact folder (checked against its weight hashes)."""

    def __init__(self, folder: Path, components: list[str]):
        from export.models.weights_record import models_from_weights_record
        from export.onnx.components import COMPONENTS as SPECS

        manifest = load_manifest(folder)
        self.available = [c for c in components if c in manifest.components]
        decoder = manifest.components.get("vae_decoder")
        self.tile = decode_tile(decoder) if decoder else None  # the runtime's decode tile
        self.models = models_from_weights_record(manifest.weights, self.available)
        self.specs = SPECS
        self._references: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def reference_x0(self, latents_small: torch.Tensor) -> torch.Tensor:
        """The fp32 eager 2x pass of ``latents_small`` (seed 0, the CPU noise convention), computed
        once per input: every backend's row at a size compares against the same one."""
        from export.reference import upscale

        known = self._references.get(tuple(latents_small.shape))
        if known is not None and torch.equal(known[0], latents_small):
            return known[1]
        with full_fp32(), torch.inference_mode():
            reference = upscale(self.models.unet, latents_small, 2, seed=0).double()
        self._references[tuple(latents_small.shape)] = (latents_small, reference)
        return reference

    def module(self, component: str) -> torch.nn.Module:
        if component not in self.available:
            raise Skip(f"the artifact folder has no {component}")
        return self.specs[component].module(self.models)

    def shapes(self, component: str, batch: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
        return self.specs[component].input_shapes(self.models, batch, h, w)


def _inputs(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(0)
    return {
        name: timesteps(shape[0], device).to(dtype) if name == "timestep"
        else torch.randn(shape, generator=generator, device=device).to(dtype)
        for name, shape in shapes.items()
    }


class EagerRunner:
    """Eager (or torch.compile'd) PyTorch in one dtype on one device."""

    def __init__(self, models: Models, backend: str, device: torch.device):
        dtype = EAGER_DTYPES[backend]
        if device.type == "cpu" and dtype != torch.float32:
            raise Skip(f"{backend} is a GPU benchmark (half precision convolutions on the CPU are not a deployment path)")
        self.models, self.dtype, self.device = models, dtype, device
        self.modules: dict[str, torch.nn.Module] = {}
        self.compiled = backend == "compile"
        self.numerics = full_fp32 if backend == "eager-fp32" else contextlib.nullcontext

    def _module(self, component: str):
        if component not in self.modules:
            # a copy: casting in place would change the shared fp32 models other runners use
            module = copy.deepcopy(self.models.module(component)).to(self.device, self.dtype)
            self.modules[component] = torch.compile(module) if self.compiled else module
        return self.modules[component]

    def call(self, component: str, size: int, noise: str | None = None) -> Callable[[], object]:
        """``noise`` is for the runtime's rows: eager rows draw theirs on the device."""
        fn = self._call(component, size)

        def run():
            with self.numerics():
                return fn()

        return run

    def _call(self, component: str, size: int) -> Callable[[], object]:
        low, high = _latent_sides(size)
        if component == "backend_pass":
            raise Skip("backend_pass is a runtime backend's row")
        if component == "pipeline":
            encoder, body = self._module("cond_encoder"), self._module("unet")
            x = _inputs(self.models.shapes("cond_encoder", 1, low, low), self.dtype, self.device)

            def run():
                cond = encoder(*x.values())
                noise = torch.randn((1, 32, high, high), device=self.device)
                return x0_from_velocity(noise, body(noise.to(self.dtype), *cond))

            return torch.inference_mode()(run)
        if component == "vae_decoder":
            decoder = self._module(component)
            z = _inputs(self.models.shapes(component, 1, high, high), self.dtype, self.device)["latents"]
            tile = self.models.tile
            return torch.inference_mode()(lambda: decode_tiled(decoder, z, tile, tile_overlap(tile)))
        side = low if component == "cond_encoder" else high
        module = self._module(component)
        args = list(_inputs(self.models.shapes(component, 1, side, side), self.dtype, self.device).values())
        return torch.inference_mode()(lambda: module(*args))


class RuntimeRunner:
    """A runtime backend through ``Upscaler`` (``pipeline``) and directly (its pass, its components)."""

    def __init__(self, folder: Path, backend: str, device: torch.device, noise: str = "auto"):
        from runtime import BackendUnavailable, Upscaler

        kind, options = RUNTIME_BACKENDS[backend]
        if device.type == "cpu" and options.get("precision") == "fp16":  # the others say themselves why not
            raise Skip(f"{backend} is a GPU benchmark (the torch backend's CPU modes: fp32, bf16)")
        if device.type != "cpu" and options.get("precision") == "int8":
            raise Skip(f"{backend} is a CPU benchmark (the folder's CPU graphs, on ONNX Runtime's CPU provider)")
        try:
            if backend == "onnxruntime-nhwc":
                self.upscaler = self._nhwc_upscaler(folder, device, noise)
            else:
                self.upscaler = Upscaler.load(folder, backend=kind, device=device, noise=noise, **options)
        except BackendUnavailable as exc:
            raise Skip(str(exc)) from exc
        self.device = device
        self.manifest = self.upscaler.manifest
        self.pass_inputs: dict[int, torch.Tensor] = {}  # the pipeline rows' input per size

    @staticmethod
    def _nhwc_upscaler(folder: Path, device: torch.device, noise: str):
        from runtime import BackendUnavailable, Upscaler
        from runtime.backends import OnnxRuntimeBackend

        if device.type != "cuda":
            raise BackendUnavailable("prefer_nhwc is a CUDA provider option")
        manifest = load_manifest(folder)
        graphs = {name: folder / record.onnx_file for name, record in manifest.components.items()}
        backend = OnnxRuntimeBackend(graphs, device, provider="cuda", cuda_options={"prefer_nhwc": "1"})
        return Upscaler(folder, manifest, backend, noise=noise)

    def close(self) -> None:
        self.upscaler.close()

    def call(self, component: str, size: int, noise: str | None = None) -> Callable[[], object]:
        from runtime import BackendUnavailable, InvalidLatentsError
        from runtime.upscale_pass import run_pass

        low, high = _latent_sides(size)
        run = self.upscaler.backend.run
        if component in ("pipeline", "backend_pass"):
            # the same input for every backend at a size: their x0 errors share one reference
            x = torch.randn((1, 32, low, low), generator=torch.Generator().manual_seed(size)).to(self.device)
            try:
                self.upscaler.check_input(x, 2)
            except InvalidLatentsError as exc:
                raise Skip(str(exc).split(". Rebuild")[0]) from exc
            if component == "pipeline":
                self.pass_inputs[size] = x
                return lambda: self.upscaler.upscale(x, scale=2, seed=0, noise=noise)
            backend = self.upscaler.backend
            noise = _DrawnNoise(torch.randn((1, 32, high, high), device=self.device))

            def backend_pass():
                with backend.on_stream():
                    fused = backend.fused_pass(x)
                    return fused(x, noise.tensor) if fused else run_pass(run, x, noise)

            return torch.inference_mode()(backend_pass)
        record = self.manifest.components.get(component)
        if record is None:
            raise Skip(f"the artifact folder has no {component}")
        try:
            self.upscaler.backend.check(component)
        except BackendUnavailable as exc:
            raise Skip(str(exc)) from exc
        # tensors between the graphs travel in the float part's type (a quantized graph's: FLOAT_PART)
        float_part = FLOAT_PART.get(record.precision, record.precision)
        if self.upscaler.backend.name.startswith("torch"):
            float_part = self.upscaler.backend.precision
        if self.upscaler.backend.run_precision(component) == CPU_INT8:
            float_part = "fp32"  # the CPU graphs' float part
        precision = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(float_part, torch.float32)
        if component == "vae_decoder":
            z = torch.randn((1, 32, high, high), device=self.device)
            tile = decode_tile(record)

            def decode(tile_latents: torch.Tensor) -> torch.Tensor:
                return run(component, {"latents": tile_latents.contiguous()})["image"]

            return torch.inference_mode()(lambda: decode_tiled(decode, z, tile, tile_overlap(tile)))
        side = low if component == "cond_encoder" else high
        shapes = profile_shapes(record, side)
        if shapes is None:
            raise Skip(f"{component} at {side}x{side} latent pixels is outside the folder's profiles")
        fp32 = {"latents_small", "timestep", "sample"}
        inputs = {
            name: (timesteps(shape[0], self.device) if name == "timestep"
                   else torch.randn(shape, device=self.device).to(torch.float32 if name in fp32 else precision))
            for name, shape in shapes.items()
        }
        return torch.inference_mode()(lambda: run(component, inputs))


class _DrawnNoise:
    """Noise drawn before the clock starts: the backend's pass without the runtime's noise work."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def next_pass(self, latents_small: torch.Tensor) -> torch.Tensor:
        return self.tensor


def profile_shapes(record, side: int) -> dict[str, tuple[int, ...]] | None:
    """Input shapes at ``side`` for batch 1, scaled from the profile whose opt is closest."""
    main = record.inputs[0]
    for profile in record.profiles:
        lo, hi = profile.min[main][2], profile.max[main][2]
        if lo <= side <= hi:
            opt = profile.opt[main][2]
            return {
                name: (1, *shape[1:2], *[_scaled(d, side, opt) for d in shape[2:]]) if len(shape) == 4 else (1, *shape[1:])
                for name, shape in profile.opt.items()
            }
    return None


def _scaled(dim: int, side: int, opt: int) -> int:
    return -(-dim * side // opt)


def _flops(models: Models | None, counters: dict, component: str, size: int) -> int | None:
    if models is None:
        return None
    low, high = _latent_sides(size)
    parts = list(PASS_COMPONENTS) if component == "pipeline" else [component]
    total = 0
    for part in parts:
        if part not in counters:
            counters[part] = FlopCounter(models.module(part))
        if part == "vae_decoder":
            # the same tiles as decode_tiled: count one tile and multiply

            tiles = len(tile_starts(high, models.tile, tile_overlap(models.tile))) ** 2
            side = min(high, models.tile)
            shapes = models.shapes(part, 1, side, side)
            total += tiles * counters[part].count([(s, torch.float32) for s in shapes.values()])
        else:
            side = low if part == "cond_encoder" else high
            shapes = models.shapes(part, 1, side, side)
            total += counters[part].count([(s, torch.float32) for s in shapes.values()])
    return total


def measured_cpu_peaks(runs: int = 5) -> dict:
    """TFLOP/s of ``PEAK_CONV`` in fp32 and bf16 on this CPU (median of ``runs``), its bf16 units,
    and which of the two is its peak (bf16 with the units; fp32 without, where bf16 is emulated).

    Measured, not computed from a datasheet: clocks under a hypervisor are unknown, and the bf16
    rate depends on the units (AMX, AVX-512 BF16, or neither).
    """
    from runtime.cpu import cpu_matrix_units

    c, side, k = PEAK_CONV["channels"], PEAK_CONV["side"], PEAK_CONV["kernel"]
    flops = 2 * c * c * k * k * side * side
    units = cpu_matrix_units()
    facts = {"bf16_units": units.describe(), "peak_precision": "bf16" if units.bf16 else "fp32",
             "peak_probe": f"{k}x{k} convolution, {c} channels, {side}x{side}, channels-last, batch 1"}
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(c, c, k, padding=k // 2, bias=False)
    x = torch.randn(1, c, side, side, generator=generator)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        layer = copy.deepcopy(conv).to(dtype=dtype, memory_format=torch.channels_last)
        data = x.to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            times, _ = time_call(lambda: layer(data), torch.device("cpu"), runs, warmup=2)
        facts[f"peak_tflops_{name}_measured"] = flops / (statistics.median(times) * 1e-3) / 1e12
    return facts


def machine_facts(device: torch.device) -> dict:
    facts = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
             "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        target = target_for_device(props.name, (props.major, props.minor), props.total_memory)
        facts.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1), peak_tflops_fp16=target.peak_tflops,
                     peak_source=f"preset {target.name}" if target.peak_tflops else "unknown GPU: no peak")
    return facts


def run_benchmark(args: argparse.Namespace, log=print) -> dict:
    device = torch.device(args.device)
    machine = machine_facts(device)
    if device.type == "cpu":
        machine.update(measured_cpu_peaks())
    try:
        models = Models(args.artifacts, ["cond_encoder", "unet", "vae_decoder"])
    except Exception as exc:  # weights not recorded or not reachable: eager rows are skipped
        models, models_error = None, str(exc)
    else:
        models_error = None
    rows, skipped, counters = [], [], {}
    for backend in args.backends:
        try:
            if backend.startswith("eager") or backend == "compile":
                if models is None:
                    raise Skip(f"cannot rebuild the eager models: {models_error}")
                runner = EagerRunner(models, backend, device)
            else:
                runner = RuntimeRunner(args.artifacts, backend, device)
        except Skip as exc:
            skipped.append({"backend": backend, "reason": str(exc)})
            log(f"{backend}: skipped ({exc})")
            continue
        for component in args.components:
            # through the runtime, the pass runs once per noise mode (the CPU has one: its convention)
            through_runtime = component == "pipeline" and isinstance(runner, RuntimeRunner)
            modes = args.noise if through_runtime and device.type == "cuda" else [None]
            for size in args.sizes:
                for noise in modes:
                    row = _measure_row(runner, backend, component, size, noise, device, args, models, counters, skipped, log)
                    if row:
                        rows.append(row)
        if isinstance(runner, RuntimeRunner):
            runner.close()
    baseline = BASELINES[device.type]
    peak = (machine.get("peak_tflops_fp16") if device.type == "cuda"
            else machine[f"peak_tflops_{machine['peak_precision']}_measured"])
    _derive(rows, peak, baseline)
    return {"machine": machine, "command": args.command, "rows": rows, "skipped": skipped, "baseline": baseline,
            "overhead": runtime_overhead(rows), "published": PUBLISHED, "schema_version": 1}


def _measure_row(runner, backend: str, component: str, size: int, noise: str | None, device: torch.device,
                 args: argparse.Namespace, models, counters: dict, skipped: list, log) -> dict | None:
    label = f"{backend} {component} {size}" + (f" noise={noise}" if noise else "")
    through_runtime = component == "pipeline" and isinstance(runner, RuntimeRunner)
    try:
        fn = runner.call(component, size, noise)
        flops = _flops(models, counters, "pipeline" if component == "backend_pass" else component, size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, first = time_call(fn, device, args.runs, args.warmup)
    except Skip as exc:
        skipped.append({"backend": backend, "component": component, "size": size, "reason": str(exc)})
        log(f"{label}: skipped ({exc})")
        return None
    except torch.OutOfMemoryError:
        skipped.append({"backend": backend, "component": component, "size": size, "reason": "out of GPU memory"})
        torch.cuda.empty_cache()
        return None
    row = {
        "backend": backend, "component": component, "size": size,
        "through_runtime": through_runtime,
        "noise": (noise or runner.upscaler.noise_mode) if through_runtime else None,
        "median_ms": statistics.median(times), "p10_ms": percentile(times, 0.1),
        "p90_ms": percentile(times, 0.9), "runs": len(times), "first_call_ms": first,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "flops": flops,
        # what ran: auto's choice, the torch backend's mode (backend names as Upscaler.backend_name)
        "runs_as": runner.upscaler.backend_name if isinstance(runner, RuntimeRunner) else backend,
    }
    if through_runtime and row["noise"] == "cpu" and device.type == "cpu" and models is not None:
        row.update(_x0_error(fn(), runner.pass_inputs[size], models))
    log(f"{label}: median {row['median_ms']:.2f} ms" + (f", x0 rel-L2 {row['x0_rel_l2']:.2e} vs fp32 eager"
                                                          if "x0_rel_l2" in row else ""))
    return row


def _x0_error(x0: torch.Tensor, latents_small: torch.Tensor, models: Models) -> dict:
    """rel-L2 and max-abs of a runtime pass's ``x0`` against the fp32 eager reference (same input,
    seed 0, the CPU noise convention): the accuracy gate's figures."""
    figures = difference(x0, models.reference_x0(latents_small))
    return {"x0_rel_l2": figures.rel_l2, "x0_max_abs": figures.max_abs}


def runtime_overhead(rows: list[dict]) -> list[dict]:
    """What ``Upscaler.upscale`` adds to its backend's pass: pipeline minus backend_pass medians.

    Input checks, the noise (per mode), stream hand-over and Python. A difference of medians from
    one run: noisy where the overhead is small against the run-to-run spread.
    """
    passes = {(r["backend"], r["size"]): r["median_ms"] for r in rows if r["component"] == "backend_pass"}
    overhead = []
    for row in rows:
        alone = passes.get((row["backend"], row["size"]))
        if not row.get("through_runtime") or alone is None:
            continue
        extra = row["median_ms"] - alone
        overhead.append({"backend": row["backend"], "size": row["size"], "noise": row["noise"],
                         "pipeline_ms": row["median_ms"], "backend_pass_ms": alone,
                         "overhead_ms": extra, "percent": 100 * extra / row["median_ms"]})
    return overhead


def _derive(rows: list[dict], peak: float | None, baseline_backend: str) -> None:
    baseline = {(r["component"], r["size"]): r["median_ms"] for r in rows if r["backend"] == baseline_backend}
    for row in rows:
        flops = row["flops"]
        row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12 if flops else None
        row["percent_of_peak"] = 100 * row["tflops"] / peak if peak and row["tflops"] else None
        row["floor_ms"] = flops / (peak * 1e12) * 1e3 if peak and flops else None
        base = baseline.get((row["component"], row["size"]))
        row["speedup"] = base / row["median_ms"] if base else None


def markdown(result: dict) -> str:
    machine = result["machine"]
    where = machine.get("gpu", f"CPU ({machine['cpu']}, {machine['cpu_threads']} threads)")
    baseline = result.get("baseline", BASELINES["cuda"])
    lines = [f"Machine: {where}; torch {machine['torch']}. Command: `{result['command']}`", ""]
    if "peak_tflops_bf16_measured" in machine:
        lines += [f"CPU peak, measured ({machine['peak_probe']}): bf16 {machine['peak_tflops_bf16_measured']:.3f} TFLOP/s, "
                  f"fp32 {machine['peak_tflops_fp32_measured']:.3f} TFLOP/s; bf16 units: {machine['bf16_units']}. "
                  f"% peak and floor ms are against the {machine['peak_precision']} figure. x0 rel-L2: the pass's output against the fp32 "
                  "eager reference (same input, seed 0).", ""]
    lines += ["| backend | component | through runtime (noise) | size px | median ms | p10 | p90 | first call ms | GFLOP | TFLOP/s "
              f"| % peak | floor ms | speedup vs {baseline} | x0 rel-L2 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in result["rows"]:
        ran = r.get("runs_as", r["backend"])
        name = r["backend"] if ran in (r["backend"], f"{r['backend']}-cpu") else f"{r['backend']} ({ran})"
        lines.append(
            f"| {name} | {r['component']} | {'yes (' + r['noise'] + ')' if r['through_runtime'] else 'no'} | "
            f"{r['size']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | {fmt(r['first_call_ms'], '.1f')} | "
            f"{fmt(r['flops'] and r['flops'] / 1e9, '.4g')} | {fmt(r['tflops'], '.3g')} | "
            f"{fmt(r['percent_of_peak'], '.1f')} | {fmt(r['floor_ms'], '.3g')} | {fmt(r['speedup'], '.2f')} | "
            f"{fmt(r.get('x0_rel_l2'), '.2e')} |"
        )
    published = result["published"]
    measured = [r for r in result["rows"] if r["backend"] == published["backend"] and r["component"] == "pipeline"
                and r["size"] == published["size"]]
    lines += ["", f"Published: {published['median_ms']} ms for the {published['size']} px pass, {published['backend']}, "
              f"{published['gpu']} ({published['source']})."]
    if measured:
        lines.append(f"Measured here: {measured[0]['median_ms']:.2f} ms on {where}. Different GPUs: not comparable.")
    for o in result["overhead"]:
        lines.append(f"Runtime overhead, {o['backend']} at {o['size']} px, {o['noise']} noise: {o['overhead_ms']:.2f} ms "
                     f"of {o['pipeline_ms']:.2f} ms ({o['percent']:.1f} %) outside the backend's pass.")
    for s in result["skipped"]:
        lines.append(f"- skipped {s['backend']}" + (f" {s['component']} {s['size']}" if "component" in s else "") + f": {s['reason']}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, component: str = "pipeline") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    rows = [r for r in result["rows"] if r["component"] == component] or result["rows"]
    component = rows[0]["component"] if rows else component
    for backend in dict.fromkeys(r["backend"] for r in rows):
        points = sorted((r["size"], r["median_ms"]) for r in rows if r["backend"] == backend)
        ax.plot(*zip(*points), marker="o", label=backend)
    floor = sorted({(r["size"], r["floor_ms"]) for r in rows if r["floor_ms"]})
    if floor:
        ax.plot(*zip(*floor), linestyle="--", color="black", label="FLOP floor (peak)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({r["size"] for r in rows})
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.set_xlabel("output size (px)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{component} on {result['machine'].get('gpu', 'CPU')}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    with atomic_output(path) as partial:
        fig.savefig(partial, format="png", dpi=120)
    plt.close(fig)


def csv_option(choices: tuple[str, ...] | None, cast=str):
    def parse(text: str):
        values = [cast(v) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"no value in {text!r}: give one or more, comma-separated"
                                             + (f", from {','.join(choices)}" if choices else ""))
        if choices:
            bad = [v for v in values if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(map(str, bad))}; choose from {', '.join(choices)}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="artifact folder from python -m export.build")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--backends", type=csv_option(BACKENDS), default=list(BACKENDS), help=",".join(BACKENDS))
    parser.add_argument("--sizes", type=csv_option(None, int), default=[1024, 2048, 4096], help="output sizes in px")
    parser.add_argument("--components", type=csv_option(COMPONENTS), default=list(COMPONENTS), help=",".join(COMPONENTS))
    parser.add_argument("--noise", type=csv_option(NOISE_MODES), default=list(NOISE_MODES),
                        help="noise modes of the runtime's pipeline rows on CUDA: device,cpu (default both; the CPU runs cpu)")
    parser.add_argument("--runs", type=int_in_range(1, 10_000), default=20, help="timed runs per row, 1..10000 (default 20)")
    parser.add_argument("--warmup", type=int_in_range(0, 1_000), default=3, help="untimed runs first, 0..1000 (default 3)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write a Markdown table")
    parser.add_argument("--plot", type=Path, help="write a PNG plot (latency vs size, log-log)")
    return parser


def write_report(result: dict, table: str, json_path: Path | None, markdown_path: Path | None) -> None:
    """Print the table; write the JSON and Markdown files asked for, each whole or not at all."""
    print(table)
    if json_path:
        with atomic_output(json_path) as partial:
            partial.write_text(json.dumps(result, indent=2) + "\n")
    if markdown_path:
        with atomic_output(markdown_path) as partial:
            partial.write_text(table)


def _nothing_to_measure(args: argparse.Namespace) -> str | None:
    """Why these options leave no row to measure on any folder (None when some row may run)."""
    backends = args.backends
    if args.device == "cpu" and set(backends) <= GPU_ONLY:
        return (f"--backends {','.join(backends)} run on CUDA only (--device cpu); on the CPU: "
                f"{','.join(b for b in BACKENDS if b not in GPU_ONLY)}")
    if set(args.components) == {"backend_pass"} and not set(backends) & set(RUNTIME_BACKENDS):
        return (f"--components backend_pass is a row of the runtime's backends ({','.join(RUNTIME_BACKENDS)}), "
                f"none of which is in --backends {','.join(backends)}")
    return None


def latency_command(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    for size in args.sizes:
        if size <= 0 or size % 32:
            parser.error(f"sizes must be positive multiples of 32 px, got {size}")
    nothing = _nothing_to_measure(args)
    if nothing:
        parser.error(f"nothing to measure: {nothing}")
    args.command = "python -m benchmarks.latency " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.json:
        check_output_file(args.json, "--json", protected=args.artifacts)
    if args.markdown:
        check_output_file(args.markdown, "--markdown", protected=args.artifacts)
    if args.plot:
        check_output_file(args.plot, "--plot", protected=args.artifacts)
    load_manifest(args.artifacts)
    result = run_benchmark(args)
    if not result["rows"]:  # the reasons of the skips were printed
        raise NothingMeasured(f"nothing was measured: every row was skipped ({len(result['skipped'])} skips, "
                              "reasons above); no file was written")
    write_report(result, markdown(result), args.json, args.markdown)
    if args.plot:
        plot(result, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals are one ``error:`` line and exit 1."""
    return run_cli(latency_command, argv)


if __name__ == "__main__":
    sys.exit(main())
