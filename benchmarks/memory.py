"""``python -m benchmarks.memory``: device memory of a chained upscale (to 8K by default) and its decode.

Stages: each 2x pass of the chain from ``--input-px`` to ``--input-px * --scale``, then the tiled
decode of the final latent. Per stage:

- an estimate, needing no GPU: per component, the activation memory its engine's builder reported
  for the profile that runs the stage's shapes, where the folder has a built engine that reports
  it (TensorRT-RTX always does; the figure is for the profile's largest batch), else the peak of
  simultaneously live activations of its ONNX graph at batch 1 (``engines.memory``, which is not
  an upper bound for engines: bf16 engines keep fp32 tensors before each GroupNorm); plus the
  weights of every component (a runtime keeps them all loaded; the engine's figure where there is
  one), plus the tensors the runtime holds across the stage (a pass: its low-res input and its
  fp32 output; the decode: the latents, the fp32 image and its blend weights). Each row says which
  source each component's figure came from.
- on CUDA, per backend: the torch allocator's peak during the stage (``max_memory_allocated``,
  reset before; for ONNX Runtime and TensorRT only the buffers torch owns) and the device memory
  in use after it (driver view, so it includes the CUDA context, ONNX Runtime's arena and anything
  else on the GPU). Every stage runs once before the measured run, so all weights are resident.
- on CUDA, per runtime backend: the whole chain end to end as an app calls it,
  ``Upscaler.upscale(latents, scale, decode=True)``: its median time over ``--runs`` and its peaks.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
from pathlib import Path

import torch

from engines.cli import int_in_range, run_cli
from engines.files import check_output_file
from engines.manifest import Manifest, load_manifest
from engines.memory import GraphMemoryModel, MemoryEstimateError
from engines.profiles import select_profile
from runtime.latents import LATENT_CHANNELS, SCALES, InvalidLatentsError
from runtime.tiling import decode_tile

from .latency import (
    RUNTIME_BACKENDS,
    EagerRunner,
    Models,
    RuntimeRunner,
    Skip,
    csv_option,
    machine_facts,
    profile_shapes,
    time_call,
    write_report,
)

BACKENDS = ("eager-fp32", "eager-fp16", "eager-bf16", *RUNTIME_BACKENDS)
GOAL_BYTES = 24 * 10**9  # issue 6: the 8K chain and its decode inside a 24 GB card
FP32 = 4
IMAGE_CHANNELS = 3
PIXELS_PER_LATENT = 8


def chain_sizes(input_px: int, scale: int) -> list[int]:
    """Output sizes of the passes of a ``scale`` upscale of an ``input_px`` image."""
    return [input_px * 2**k for k in range(1, int(math.log2(scale)) + 1)]


def _stage_name(kind: str, size: int) -> str:
    return f"pass {size // 2}->{size} px" if kind == "pass" else f"decode {size} px"


class ChainEstimate:
    """Graph-based estimates of each stage, from the ONNX files an artifact folder names."""

    def __init__(self, folder: Path, manifest: Manifest):
        self.records = manifest.components
        self.graphs = {name: GraphMemoryModel(folder / record.onnx_file) for name, record in self.records.items()}
        self.weights = sum(self._engine_facts(name).get("weights_bytes", self.graphs[name].weights)
                           for name in self.records)
        self.sources: dict[str, str] = {}

    def _engine_facts(self, component: str) -> dict:
        engine = self.records[component].engine
        return engine.facts if engine.built else {}

    def _activations(self, component: str, side: int) -> int:
        record = self.records[component]
        shapes = profile_shapes(record, side)
        if shapes is None:
            raise Skip(f"{component} at {side}x{side} latent pixels is outside the folder's profiles")
        reported = self._engine_facts(component).get("activation_bytes_per_profile")
        profile = select_profile(record.profiles, shapes)
        if reported and profile is not None and profile < len(reported):
            self.sources[component] = f"engine ({record.profiles[profile].name})"
            return reported[profile]
        self.sources[component] = "onnx estimate"
        return self.graphs[component].estimate(shapes).activations

    def tile_side(self) -> int:
        return decode_tile(self.records["vae_decoder"])

    def stage(self, kind: str, size: int) -> dict:
        self.sources = {}
        high = size // PIXELS_PER_LATENT
        if kind == "pass":
            low = high // 2
            activations = max(self._activations("cond_encoder", low), self._activations("unet", high))
            held = LATENT_CHANNELS * (low * low + high * high) * FP32
        else:
            if "vae_decoder" not in self.records:
                raise Skip("the artifact folder has no vae_decoder")
            activations = self._activations("vae_decoder", min(high, self.tile_side()))
            pixels = size * size
            held = (LATENT_CHANNELS * high * high + (IMAGE_CHANNELS + 1) * pixels) * FP32
        return {"activations_bytes": activations, "weights_bytes": self.weights, "held_bytes": held,
                "total_bytes": activations + self.weights + held, "sources": dict(self.sources)}


def _measure(fn, device: torch.device) -> dict:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"torch_peak_bytes": torch.cuda.max_memory_allocated(device), "device_in_use_bytes": total - free}


def run_benchmark(args: argparse.Namespace, log=print) -> dict:
    device = torch.device(args.device)
    manifest = load_manifest(args.artifacts)
    stages = [("pass", size) for size in chain_sizes(args.input_px, args.scale)]
    stages.append(("decode", stages[-1][1]))
    rows, skipped, chain = [], [], {}
    try:
        estimator = ChainEstimate(args.artifacts, manifest)
    except (MemoryEstimateError, OSError) as exc:
        estimator = None
        skipped.append({"backend": "estimate", "reason": str(exc)})
    for kind, size in stages:
        row = {"stage": _stage_name(kind, size), "kind": kind, "output_px": size, "estimate": None, "measured": {}}
        if estimator is not None:
            try:
                row["estimate"] = estimator.stage(kind, size)
                log(f"{row['stage']}: estimate {row['estimate']['total_bytes'] / 2**30:.2f} GiB")
            except Skip as exc:
                skipped.append({"backend": "estimate", "stage": row["stage"], "reason": str(exc)})
        rows.append(row)
    if device.type == "cuda":
        _measure_backends(args, device, stages, rows, chain, skipped, log)
    elif args.backends:
        skipped.append({"backend": ",".join(args.backends), "reason": "measured only on CUDA (the estimate runs anywhere)"})
    estimated = [r["estimate"]["total_bytes"] for r in rows if r["estimate"]]
    return {
        "machine": machine_facts(device), "command": args.command, "input_px": args.input_px, "scale": args.scale,
        "rows": rows, "chain": chain, "skipped": skipped, "goal_bytes": GOAL_BYTES,
        "estimate_peak_bytes": max(estimated) if estimated else None, "schema_version": 1,
    }


def _measure_chain(runner: RuntimeRunner, args: argparse.Namespace, device: torch.device) -> dict:
    """The whole chain and its decode through ``Upscaler.upscale``: median time, then its peaks."""
    side = args.input_px // 8
    x = torch.randn((1, LATENT_CHANNELS, side, side), device=device)
    runner.upscaler.check_input(x, args.scale, decode=True)

    def chain():
        return runner.upscaler.upscale(x, scale=args.scale, decode=True)

    times, _ = time_call(chain, device, args.runs, warmup=1)
    return {"median_ms": statistics.median(times), "runs": len(times), "noise": runner.upscaler.noise_mode,
            **_measure(chain, device)}


def _measure_backends(args, device, stages, rows, chain, skipped, log) -> None:
    models = None
    for backend in args.backends:
        try:
            if backend.startswith("eager"):
                models = models or Models(args.artifacts, ["cond_encoder", "unet", "vae_decoder"])
                runner = EagerRunner(models, backend, device)
            else:
                runner = RuntimeRunner(args.artifacts, backend, device)
            calls = []
            for kind, size in stages:
                try:
                    calls.append(runner.call("pipeline" if kind == "pass" else "vae_decoder", size))
                except Skip as exc:
                    calls.append(None)
                    skipped.append({"backend": backend, "stage": _stage_name(kind, size), "reason": str(exc)})
            for call in calls:  # warm-up: every module loaded, every workspace allocated
                if call is not None:
                    call()
            for (kind, size), call, row in zip(stages, calls, rows):
                if call is not None:
                    row["measured"][backend] = _measure(call, device)
                    log(f"{backend} {row['stage']}: peak {row['measured'][backend]['torch_peak_bytes'] / 2**30:.2f} GiB")
            if isinstance(runner, RuntimeRunner):
                calls = None
                try:
                    chain[backend] = _measure_chain(runner, args, device)
                    log(f"{backend} chain end to end: {chain[backend]['median_ms']:.0f} ms, "
                        f"peak {chain[backend]['torch_peak_bytes'] / 2**30:.2f} GiB")
                except InvalidLatentsError as exc:
                    skipped.append({"backend": backend, "stage": "chain", "reason": str(exc)})
                runner.close()
        except Skip as exc:
            skipped.append({"backend": backend, "reason": str(exc)})
            log(f"{backend}: skipped ({exc})")
        except torch.OutOfMemoryError:
            skipped.append({"backend": backend, "reason": "out of GPU memory"})
        finally:
            runner = calls = None
            torch.cuda.empty_cache()


def markdown(result: dict) -> str:
    machine = result["machine"]
    where = machine.get("gpu", f"CPU ({machine['cpu']})")
    backends = list(dict.fromkeys(b for r in result["rows"] for b in r["measured"]))
    gib = 2**30

    def fmt(value):
        return "-" if value is None else f"{value / gib:.2f}"

    header = "| stage | estimate GiB (activations + weights + held) |" + "".join(
        f" {b} torch peak GiB | {b} device in use GiB |" for b in backends)
    lines = [f"Machine: {where}; torch {machine['torch']}. Command: `{result['command']}`", "", header,
             "|---|---|" + "---|---|" * len(backends)]
    for r in result["rows"]:
        e = r["estimate"]
        sources = "" if e is None or not e.get("sources") else (
            "; activations from " + ", ".join(f"{c}: {how}" for c, how in e["sources"].items()))
        estimate = "-" if e is None else (f"{fmt(e['total_bytes'])} ({fmt(e['activations_bytes'])} + "
                                          f"{fmt(e['weights_bytes'])} + {fmt(e['held_bytes'])}{sources})")
        cells = "".join(
            f" {fmt(r['measured'].get(b, {}).get('torch_peak_bytes'))} | {fmt(r['measured'].get(b, {}).get('device_in_use_bytes'))} |"
            for b in backends)
        lines.append(f"| {r['stage']} | {estimate} |{cells}")
    goal, peak = result["goal_bytes"], result["estimate_peak_bytes"]
    if peak is not None:
        verdict = "inside" if peak <= goal else "over"
        lines += ["", f"Estimated peak {peak / gib:.2f} GiB: {verdict} the goal of {goal / 1e9:.0f} GB "
                      f"({goal / gib:.2f} GiB) for the chain and its decode."]
    for backend, c in result["chain"].items():
        lines.append(f"Chain end to end through Upscaler.upscale(scale={result['scale']}, decode=True), {backend}, "
                     f"{c['noise']} noise: median {c['median_ms']:.0f} ms over {c['runs']} runs, torch peak "
                     f"{fmt(c['torch_peak_bytes'])} GiB, device in use {fmt(c['device_in_use_bytes'])} GiB.")
    for s in result["skipped"]:
        lines.append(f"- skipped {s['backend']}" + (f" {s['stage']}" if "stage" in s else "") + f": {s['reason']}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="artifact folder from python -m export.build")
    parser.add_argument("--input-px", type=int_in_range(16, 65536), default=1024, help="input image side in px, a multiple of 16 from 16 to 65536 (default 1024)")
    parser.add_argument("--scale", type=int, default=8, choices=SCALES, help="upscale factor (default 8: 1024 -> 8192 px)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                        help="cuda measures the backends; cpu gives the estimate only")
    parser.add_argument("--backends", type=csv_option(BACKENDS), default=["eager-fp16", "onnxruntime", "tensorrt"],
                        help=f"measured on CUDA: {','.join(BACKENDS)} (default eager-fp16,onnxruntime,tensorrt)")
    parser.add_argument("--runs", type=int_in_range(1, 1_000), default=3,
                        help="timed runs of the whole chain per runtime backend, 1..1000 (default 3)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write a Markdown table")
    return parser


def memory_command(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    if args.input_px <= 0 or args.input_px % 16:
        parser.error(f"--input-px must be a positive multiple of 16 px, got {args.input_px}")
    args.command = "python -m benchmarks.memory " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.json:
        check_output_file(args.json, "--json", protected=args.artifacts)
    if args.markdown:
        check_output_file(args.markdown, "--markdown", protected=args.artifacts)
    load_manifest(args.artifacts)
    result = run_benchmark(args)
    write_report(result, markdown(result), args.json, args.markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals are one ``error:`` line and exit 1."""
    return run_cli(memory_command, argv)


if __name__ == "__main__":
    sys.exit(main())
