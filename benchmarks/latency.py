"""``python -m benchmarks.latency``: latency of each backend per component and per 2x pass.

Sizes are output image sides in pixels (1024 = latent 64 -> 128). Rows:
- ``cond_encoder`` at the pass's low-res latent (size/16), ``unet`` at its sample (size/8),
  ``vae_decoder`` decoding the output latent (size/8) in the runtime's tiles;
- ``pipeline``: one 2x pass. For eager and compiled PyTorch: encoder + unet + ``x0 = noise - v``
  with noise drawn on the device. For onnxruntime and tensorrt: ``Upscaler.upscale(scale=2)``,
  which also validates the input and draws the noise on the CPU (the seeded convention).

GPU timing uses CUDA events around each call after warm-up; CPU timing uses perf_counter. Each
row has FLOPs counted on the meta device, achieved TFLOP/s, the share of the GPU's peak (target
presets), and the speedup over eager fp16 at the same component and size in the same run.
"""

from __future__ import annotations

import argparse
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
from engines.manifest import ManifestError, load_manifest
from engines.targets import target_for_device
from engines.files import OutputPathError, atomic_output, check_output_file
from runtime.latents import TIMESTEP
from runtime.tiling import decode_tiled

from .flops import FlopCounter

BACKENDS = ("eager-fp32", "eager-fp16", "eager-bf16", "compile", "onnxruntime", "tensorrt")
COMPONENTS = ("cond_encoder", "unet", "vae_decoder", "pipeline")
EAGER_DTYPES = {"eager-fp32": torch.float32, "eager-fp16": torch.float16, "eager-bf16": torch.bfloat16, "compile": torch.float16}
RUNTIME_BACKENDS = ("onnxruntime", "tensorrt")
BASELINE = "eager-fp16"
PUBLISHED = {"size": 1024, "median_ms": 8.09, "gpu": "NVIDIA GeForce RTX 5090", "backend": "eager-fp16",
             "source": "MODEL.md section 4 (CTGMWorkshop benchmark, model in train mode)"}
VAE_TILE = 128


class Skip(Exception):
    """A backend or row that cannot run here; the message is recorded in the output."""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def time_call(fn: Callable[[], object], device: torch.device, runs: int, warmup: int) -> list[float]:
    """Milliseconds per call, each measured alone (synchronised), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
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
    return times


def _latent_sides(size: int) -> tuple[int, int]:
    if size % 32:
        raise SystemExit(f"error: sizes must be multiples of 32 px (got {size})")
    return size // 16, size // 8


class Models:
    """The eager fp32 models of an artifact folder (checked against its weight hashes)."""

    def __init__(self, folder: Path, components: list[str]):
        from export.build import models_from_weights_record
        from export.onnx.components import COMPONENTS as SPECS

        manifest = load_manifest(folder)
        self.available = [c for c in components if c in manifest.components]
        self.models = models_from_weights_record(manifest.weights, self.available)
        self.specs = SPECS

    def module(self, component: str) -> torch.nn.Module:
        if component not in self.available:
            raise Skip(f"the artifact folder has no {component}")
        return self.specs[component].module(self.models)

    def shapes(self, component: str, batch: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
        return self.specs[component].input_shapes(self.models, batch, h, w)


def _inputs(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(0)
    return {
        name: torch.full(shape, TIMESTEP, dtype=dtype, device=device) if name == "timestep"
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

    def _module(self, component: str):
        if component not in self.modules:
            # a copy: casting in place would change the shared fp32 models other runners use
            module = copy.deepcopy(self.models.module(component)).to(self.device, self.dtype)
            self.modules[component] = torch.compile(module) if self.compiled else module
        return self.modules[component]

    def call(self, component: str, size: int) -> Callable[[], object]:
        low, high = _latent_sides(size)
        if component == "pipeline":
            encoder, body = self._module("cond_encoder"), self._module("unet")
            x = _inputs(self.models.shapes("cond_encoder", 1, low, low), self.dtype, self.device)

            def run():
                cond = encoder(*x.values())
                noise = torch.randn((1, 32, high, high), device=self.device)
                return noise - body(noise.to(self.dtype), *cond).float()

            return torch.inference_mode()(run)
        if component == "vae_decoder":
            decoder = self._module(component)
            z = _inputs(self.models.shapes(component, 1, high, high), self.dtype, self.device)["latents"]
            return torch.inference_mode()(lambda: decode_tiled(decoder, z, VAE_TILE, VAE_TILE // 4))
        side = low if component == "cond_encoder" else high
        module = self._module(component)
        args = list(_inputs(self.models.shapes(component, 1, side, side), self.dtype, self.device).values())
        return torch.inference_mode()(lambda: module(*args))


class RuntimeRunner:
    """A runtime backend (onnxruntime or tensorrt) through ``Upscaler`` and its backend."""

    def __init__(self, folder: Path, backend: str, device: torch.device):
        from runtime import BackendUnavailable, Upscaler

        try:
            self.upscaler = Upscaler.load(folder, backend=backend, device=device)
        except BackendUnavailable as exc:
            raise Skip(str(exc)) from exc
        self.device = device
        self.manifest = self.upscaler.manifest

    def call(self, component: str, size: int) -> Callable[[], object]:
        from runtime import BackendUnavailable, InvalidLatentsError

        low, high = _latent_sides(size)
        run = self.upscaler.backend.run
        if component == "pipeline":
            x = torch.randn((1, 32, low, low), device=self.device)
            try:
                self.upscaler.check_input(x, 2)
            except InvalidLatentsError as exc:
                raise Skip(str(exc).split(". Rebuild")[0]) from exc
            return lambda: self.upscaler.upscale(x, scale=2, seed=0)
        record = self.manifest.components.get(component)
        if record is None:
            raise Skip(f"the artifact folder has no {component}")
        try:
            self.upscaler.backend.check(component)
        except BackendUnavailable as exc:
            raise Skip(str(exc)) from exc
        # tensors between the graphs travel in the float part's type (a quantized graph's: FLOAT_PART)
        float_part = FLOAT_PART.get(record.precision, record.precision)
        precision = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(float_part, torch.float32)
        if component == "vae_decoder":
            z = torch.randn((1, 32, high, high), device=self.device)
            tile = max(record.profiles[0].max["latents"][2:])

            def decode(tile_latents: torch.Tensor) -> torch.Tensor:
                return run(component, {"latents": tile_latents.contiguous()})["image"]

            return lambda: decode_tiled(decode, z, tile, tile // 4)
        side = low if component == "cond_encoder" else high
        shapes = profile_shapes(record, side)
        if shapes is None:
            raise Skip(f"{component} at {side}x{side} latent pixels is outside the folder's profiles")
        fp32 = {"latents_small", "timestep", "sample"}
        inputs = {
            name: (torch.full(shape, TIMESTEP, device=self.device) if name == "timestep"
                   else torch.randn(shape, device=self.device).to(torch.float32 if name in fp32 else precision))
            for name, shape in shapes.items()
        }
        return lambda: run(component, inputs)


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
    parts = ["cond_encoder", "unet"] if component == "pipeline" else [component]
    total = 0
    for part in parts:
        if part not in counters:
            counters[part] = FlopCounter(models.module(part))
        if part == "vae_decoder":
            # the same tiles as decode_tiled: count one tile and multiply
            from runtime.tiling import tile_starts

            tiles = len(tile_starts(high, VAE_TILE, VAE_TILE // 4)) ** 2
            side = min(high, VAE_TILE)
            shapes = models.shapes(part, 1, side, side)
            total += tiles * counters[part].count([(s, torch.float32) for s in shapes.values()])
        else:
            side = low if part == "cond_encoder" else high
            shapes = models.shapes(part, 1, side, side)
            total += counters[part].count([(s, torch.float32) for s in shapes.values()])
    return total


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
            for size in args.sizes:
                try:
                    fn = runner.call(component, size)
                    flops = _flops(models, counters, component, size)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    times = time_call(fn, device, args.runs, args.warmup)
                except Skip as exc:
                    skipped.append({"backend": backend, "component": component, "size": size, "reason": str(exc)})
                    log(f"{backend} {component} {size}: skipped ({exc})")
                    continue
                except torch.OutOfMemoryError:
                    skipped.append({"backend": backend, "component": component, "size": size, "reason": "out of GPU memory"})
                    torch.cuda.empty_cache()
                    continue
                row = {
                    "backend": backend, "component": component, "size": size,
                    "median_ms": statistics.median(times), "p10_ms": _percentile(times, 0.1),
                    "p90_ms": _percentile(times, 0.9), "runs": len(times),
                    "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                    "flops": flops,
                }
                rows.append(row)
                log(f"{backend} {component} {size}: median {row['median_ms']:.2f} ms")
    _derive(rows, machine.get("peak_tflops_fp16"))
    return {"machine": machine, "command": args.command, "rows": rows, "skipped": skipped,
            "overhead": runtime_overhead(rows), "published": PUBLISHED, "schema_version": 1}


def runtime_overhead(rows: list[dict]) -> list[dict]:
    """What ``Upscaler.upscale`` adds to its two graphs: pipeline minus cond_encoder and unet medians.

    Input checks, the seeded CPU noise and its copy, ``x0 = noise - v`` and Python. A difference
    of medians from one run: noisy where the overhead is small against the run-to-run spread.
    """
    medians = {(r["backend"], r["component"], r["size"]): r["median_ms"] for r in rows}
    overhead = []
    for (backend, component, size), pipeline in medians.items():
        parts = [medians.get((backend, part, size)) for part in ("cond_encoder", "unet")]
        if component != "pipeline" or backend not in RUNTIME_BACKENDS or None in parts:
            continue
        extra = pipeline - sum(parts)
        overhead.append({"backend": backend, "size": size, "pipeline_ms": pipeline, "graphs_ms": sum(parts),
                         "overhead_ms": extra, "percent": 100 * extra / pipeline})
    return overhead


def _derive(rows: list[dict], peak: float | None) -> None:
    baseline = {(r["component"], r["size"]): r["median_ms"] for r in rows if r["backend"] == BASELINE}
    for row in rows:
        flops = row["flops"]
        row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12 if flops else None
        row["percent_of_peak"] = 100 * row["tflops"] / peak if peak and row["tflops"] else None
        row["floor_ms"] = flops / (peak * 1e12) * 1e3 if peak and flops else None
        base = baseline.get((row["component"], row["size"]))
        row["speedup_vs_eager_fp16"] = base / row["median_ms"] if base else None


def markdown(result: dict) -> str:
    machine = result["machine"]
    where = machine.get("gpu", f"CPU ({machine['cpu']}, {machine['cpu_threads']} threads)")
    lines = [f"Machine: {where}; torch {machine['torch']}. Command: `{result['command']}`", "",
             "| backend | component | size px | median ms | p10 | p90 | GFLOP | TFLOP/s | % peak | floor ms | speedup vs eager-fp16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in result["rows"]:
        lines.append(
            f"| {r['backend']} | {r['component']} | {r['size']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | "
            f"{r['p90_ms']:.2f} | {fmt(r['flops'] and r['flops'] / 1e9, '.4g')} | {fmt(r['tflops'], '.3g')} | "
            f"{fmt(r['percent_of_peak'], '.1f')} | {fmt(r['floor_ms'], '.3g')} | {fmt(r['speedup_vs_eager_fp16'], '.2f')} |"
        )
    published = result["published"]
    measured = [r for r in result["rows"] if r["backend"] == published["backend"] and r["component"] == "pipeline"
                and r["size"] == published["size"]]
    lines += ["", f"Published: {published['median_ms']} ms for the {published['size']} px pass, {published['backend']}, "
              f"{published['gpu']} ({published['source']})."]
    if measured:
        lines.append(f"Measured here: {measured[0]['median_ms']:.2f} ms on {where}. Different GPUs: not comparable.")
    for o in result["overhead"]:
        lines.append(f"Runtime overhead, {o['backend']} at {o['size']} px: {o['overhead_ms']:.2f} ms of "
                     f"{o['pipeline_ms']:.2f} ms ({o['percent']:.1f} %) outside the two graphs.")
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
        values = [cast(v) for v in text.split(",") if v]
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    for size in args.sizes:
        if size <= 0 or size % 32:
            parser.error(f"sizes must be positive multiples of 32 px, got {size}")
    args.command = "python -m benchmarks.latency " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if args.json:
            check_output_file(args.json, "--json", protected=args.artifacts)
        if args.markdown:
            check_output_file(args.markdown, "--markdown", protected=args.artifacts)
        if args.plot:
            check_output_file(args.plot, "--plot", protected=args.artifacts)
        load_manifest(args.artifacts)
    except (ManifestError, OutputPathError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = run_benchmark(args)
    write_report(result, markdown(result), args.json, args.markdown)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
