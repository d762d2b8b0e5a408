"""``python -m benchmarks.serving``: throughput and latency of the served model ``flow_upscaler`` on Triton.

Concurrent clients (threads, each with its own ``tritonclient.http`` client, binary tensors) send
2x/4x/8x requests back to back, for each client count of ``--clients``: first ``--warmup``
requests each, untimed, then ``--requests`` each, timed. Per client count: successful requests/s
and latents/s over the wall time of the timed requests (first start to last answer), p50/p90/p99
latency in ms over the successful requests of all clients, and the errors (a failed request or
an answer of the wrong shape is counted, the run goes on).

The server is either started here from ``--artifacts`` on free loopback ports, as ``runtime.serve``
starts it (``runtime.serving.supervisor.Service``, not restarted if it dies; the time from start to
ready is reported; it is stopped at the end, also on errors and Ctrl-C), or a running one (``--url``). Before measuring, one request goes through it as ``runtime.serve``'s ready check: a
server started here must answer it equal to ``Upscaler`` on the same folder and backend, a running
one with a finite ``upscaled`` tensor of the right type and shape; else the run stops with what
came back. The clients run on the same machine as a server started here and share its cores.
The input size comes from the folder's manifest: its smallest admitted side by default.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engines.cli import int_in_range, run_cli
from engines.errors import FlowUpscalerError
from engines.files import check_output_file
from engines.manifest import Manifest, load_manifest
from engines.profiles import admitting_profile
from runtime.latents import LATENT_CHANNELS, SCALES
from runtime.serve import DEVICES
from runtime.serving.ready import ReadyCheck
from runtime.serving.repository import MODEL_NAME, ServedModel, folder_max_batch
from runtime.serving.requests import LATENTS, SCALE, SEED, UPSCALED
from runtime.serving.server import Ports
from runtime.serving.supervisor import Service
from runtime.inputs import PIXELS_PER_LATENT, pass_inputs
from runtime.metrics import percentile
from runtime.selection import BACKENDS

from .latency import machine_facts, write_report

LATENT_GRID = 2  # the runtime takes latent sides that are multiples of 2 (16 px)
ERROR_SAMPLES = 5  # distinct error messages kept per row


class ServingBenchmarkError(FlowUpscalerError, RuntimeError):
    """The benchmark cannot run as asked (size outside the folder, server unreachable); the message says why."""


def admitted_sides(manifest: Manifest, scale: int, batch: int) -> list[int]:
    """Low-res latent sides (square inputs) whose every pass at ``scale`` and ``batch`` the folder's profiles admit."""
    profiles = manifest.components["cond_encoder"].profiles
    lo = min(min(p.min["latents_small"][2:]) for p in profiles)
    hi = max(max(p.max["latents_small"][2:]) for p in profiles)
    start = -(-lo // LATENT_GRID) * LATENT_GRID
    return [
        side for side in range(start, hi + 1, LATENT_GRID)
        if all(admitting_profile(manifest.components[c].profiles, name, shape) is not None
               for c, name, shape, _ in pass_inputs(batch, side, side, scale))
    ]


def input_side(manifest: Manifest, artifacts: Path, input_px: int | None, scale: int, batch: int) -> int:
    """The low-res latent side to send: ``input_px / 8``, or the smallest the folder admits; refused with the range."""
    sides = admitted_sides(manifest, scale, batch)
    if not sides:
        raise ServingBenchmarkError(
            f"{artifacts} admits no input size at --scale {scale} and --batch {batch}; lower --batch or --scale, "
            f"or rebuild: {manifest.rebuild_command}"
        )
    if input_px is None:
        return sides[0]
    side, rest = divmod(input_px, PIXELS_PER_LATENT)
    if rest or side not in sides:
        lo, hi = sides[0] * PIXELS_PER_LATENT, sides[-1] * PIXELS_PER_LATENT
        gaps = "" if len(sides) == (sides[-1] - sides[0]) // LATENT_GRID + 1 else " (not all of them)"
        raise ServingBenchmarkError(
            f"--input-px {input_px} is outside what {artifacts} admits at --scale {scale} and --batch {batch}: "
            f"multiples of {LATENT_GRID * PIXELS_PER_LATENT} px from {lo} to {hi} px{gaps}"
        )
    return side


@dataclass
class _ClientRun:
    """What one client thread measured: latencies of good answers, errors, its timed window."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    failure: Exception | None = None  # what stopped the thread (it then broke the others' start barrier)


class Load:
    """The requests of a run (every client count): inputs made beforehand, one seed per latent, never reused."""

    def __init__(self, url: str, side: int, scale: int, batch: int, timeout_s: float):
        self.url, self.side, self.scale, self.batch, self.timeout_s = url, side, scale, batch, timeout_s
        self.expected = (batch, LATENT_CHANNELS, side * scale, side * scale)
        self.seeds = itertools.count()  # next() is atomic under the GIL: unique seeds across threads
        self.stop = threading.Event()

    def _inputs(self, client_index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(client_index)
        latents = rng.standard_normal((self.batch, LATENT_CHANNELS, self.side, self.side), dtype=np.float32)
        return latents, np.full((self.batch, 1), self.scale, dtype=np.int32)

    def _one(self, client, latents: np.ndarray, scale: np.ndarray) -> str | None:
        """Send one request; None if the answer has the expected shape, else what went wrong."""
        from tritonclient import http

        seeds = np.array([[next(self.seeds)] for _ in range(self.batch)], dtype=np.int64)
        inputs = []
        for name, array, kind in ((LATENTS, latents, "FP32"), (SCALE, scale, "INT32"), (SEED, seeds, "INT64")):
            tensor = http.InferInput(name, list(array.shape), kind)
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        try:
            answer = client.infer(MODEL_NAME, inputs, outputs=[http.InferRequestedOutput(UPSCALED, binary_data=True)])
            upscaled = answer.as_numpy(UPSCALED)
        except Exception as exc:  # noqa: BLE001 - any failed request (refusal, connection, timeout) is counted
            return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if upscaled is None or upscaled.shape != self.expected or upscaled.dtype != np.float32:
            got = "no output" if upscaled is None else f"{upscaled.dtype} {list(upscaled.shape)}"
            return f"{UPSCALED} should be float32 {list(self.expected)}, got {got}"
        return None

    def client(self, index: int, warmup: int, requests: int, ready: threading.Barrier, run: _ClientRun) -> None:
        """One client thread: warm-up, wait for the others, then the timed requests."""
        try:
            self._client(index, warmup, requests, ready, run)
        except threading.BrokenBarrierError:  # another client failed, or the run was interrupted
            return
        except Exception as exc:  # noqa: BLE001 - a bug: re-raised by measure; the others must not wait for this one
            run.failure = exc
            ready.abort()

    def _client(self, index: int, warmup: int, requests: int, ready: threading.Barrier, run: _ClientRun) -> None:
        from tritonclient import http

        client = http.InferenceServerClient(self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
        try:
            latents, scale = self._inputs(index)
            for _ in range(warmup):
                if self.stop.is_set():
                    return
                self._one(client, latents, scale)
            ready.wait()
            run.start = time.perf_counter()
            for _ in range(requests):
                if self.stop.is_set():
                    return
                begin = time.perf_counter()
                error = self._one(client, latents, scale)
                if error is None:
                    run.latencies_ms.append((time.perf_counter() - begin) * 1e3)
                else:
                    run.errors.append(error)
            run.end = time.perf_counter()
        finally:
            client.close()


def measure(load: Load, clients: int, warmup: int, requests: int) -> dict:
    """One row: ``clients`` threads, each ``warmup`` then ``requests`` requests back to back."""
    runs = [_ClientRun() for _ in range(clients)]
    ready = threading.Barrier(clients)
    threads = [
        threading.Thread(target=load.client, args=(i, warmup, requests, ready, runs[i]), name=f"client-{i}", daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:
        if any(thread.is_alive() for thread in threads):  # interrupted: let the clients quit
            load.stop.set()
            ready.abort()
    for run in runs:
        if run.failure is not None:
            raise run.failure
    latencies = [ms for run in runs for ms in run.latencies_ms]
    errors = [e for run in runs for e in run.errors]
    wall = max(run.end for run in runs) - min(run.start for run in runs)
    good = len(latencies)
    return {
        "clients": clients, "requests": good + len(errors), "errors": len(errors),
        "error_samples": list(dict.fromkeys(errors))[:ERROR_SAMPLES], "wall_s": wall,
        "requests_per_s": good / wall if wall > 0 else None,
        "latents_per_s": good * load.batch / wall if wall > 0 else None,
        "p50_ms": percentile(latencies, 0.5), "p90_ms": percentile(latencies, 0.9), "p99_ms": percentile(latencies, 0.99),
    }


def server_facts(url: str, timeout_s: float) -> dict:
    """What the server runs (its model configuration), or a refusal if it or the model is not ready."""
    from tritonclient import http
    from tritonclient.utils import InferenceServerException

    try:
        client = http.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        try:
            if not client.is_model_ready(MODEL_NAME):
                raise ServingBenchmarkError(f"the server at {url} has no ready model {MODEL_NAME}; serve one with python -m runtime.serve")
            config = client.get_model_config(MODEL_NAME)
        finally:
            client.close()
    except (InferenceServerException, OSError) as exc:  # refused, unknown host, timeout, HTTP error
        raise ServingBenchmarkError(
            f"cannot reach a Triton server at {url} ({type(exc).__name__}: {' '.join(str(exc).split())}); "
            "give --url host:port of a running python -m runtime.serve, or --artifacts without --url to start one"
        ) from None
    groups = config.get("instance_group", [])
    parameters = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
    return {
        "artifacts": parameters.get("artifacts"),  # as the server names it: a path on its machine
        "backend": parameters.get("backend"),
        "device": "cuda" if any(g.get("kind") == "KIND_GPU" for g in groups) else "cpu",
        "max_batch": config.get("max_batch_size"),
        "instances": sum(g.get("count", 1) for g in groups),
        "max_queue_delay_us": int(config.get("dynamic_batching", {}).get("max_queue_delay_microseconds", 0)),
    }


def served_model(args: argparse.Namespace) -> ServedModel:
    """The model to start here; refuses a --max-batch or --batch beyond what the folder takes."""
    model = ServedModel.for_folder(
        args.artifacts, backend=args.backend, device=args.device, instances=args.instances, max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
    )
    if args.batch > model.max_batch:
        raise ServingBenchmarkError(f"--batch {args.batch} is more than the server's max batch: 1..{model.max_batch}")
    return model


def run_rows(args: argparse.Namespace, url: str, side: int, log=print) -> list[dict]:
    load = Load(url, side, args.scale, args.batch, args.request_timeout_s)
    rows = []
    for clients in args.clients:
        log(f"{clients} client(s): {args.warmup} warm-up + {args.requests} timed requests each...")
        row = measure(load, clients, args.warmup, args.requests)
        rows.append(row)
        log(f"{clients} client(s): {_fmt(row['requests_per_s'], '.2f')} req/s, p50 {_fmt(row['p50_ms'], '.0f')} ms, "
            f"p99 {_fmt(row['p99_ms'], '.0f')} ms, {row['errors']} error(s)")
        for sample in row["error_samples"]:
            log(f"  error: {sample}")
    return rows


def run_benchmark(args: argparse.Namespace, log=print) -> dict:
    """Start or reach the server, measure every client count, stop what was started."""
    manifest = load_manifest(args.artifacts)
    limit = folder_max_batch(args.artifacts)
    if args.batch > limit:
        raise ServingBenchmarkError(f"--batch {args.batch} is more than {args.artifacts} was built for: 1..{limit}")
    side = input_side(manifest, args.artifacts, args.input_px, args.scale, args.batch)
    size = {"input_px": side * PIXELS_PER_LATENT, "latent_side": side, "output_px": side * args.scale * PIXELS_PER_LATENT}
    log(f"input {size['input_px']} px (latent {side}x{side}) x{args.scale}, batch {args.batch} per request")
    if args.url:
        url = args.url
        server = {**server_facts(url, args.request_timeout_s), "url": url, "backend_resolved": None}  # only its log says
        startup_s = None
        if server["artifacts"] != str(args.artifacts.resolve()):
            log(f"note: the server serves {server['artifacts']}; sizes are taken from {args.artifacts} (give the same folder or a copy)")
        if args.batch > server["max_batch"]:
            raise ServingBenchmarkError(f"--batch {args.batch} is more than the server's max batch: 1..{server['max_batch']}")
        _ready_check(ReadyCheck.shapes_only(admitted_sides(manifest, 2, 1)[0]), url, args.request_timeout_s, log)
        rows = run_rows(args, url, side, log)
    else:
        model = served_model(args)
        resolved: dict[str, str] = {}

        def echo(line: str) -> None:
            if MODEL_NAME in line:
                log(f"triton: {line}")
                if "flow_upscaler ready" in line and " backend " in line:
                    resolved["backend"] = line.split(" backend ", 1)[1].split()[0]

        check = ReadyCheck.against_upscaler(model)
        log(f"starting Triton with {model.artifacts} (backend {model.backend}, {'GPU' if model.gpu else 'CPU'}, "
            f"{model.instances} instance(s), max batch {model.max_batch}, max queue delay {model.max_queue_delay_us} us)...")
        service = Service(model, check, "127.0.0.1", Ports.free(), ready_timeout_s=args.ready_timeout, echo=echo)
        try:
            startup_s = service.start()
            url = service.server.address
            log(f"ready in {startup_s:.1f} s at {service.server.url}")
            log(f"checked: {check.describe()}")
            server = {**server_facts(url, args.request_timeout_s), "url": url, "backend_resolved": resolved.get("backend")}
            rows = run_rows(args, url, side, log)
        finally:
            service.stop()
    facts = machine_facts(torch.device("cuda" if server["device"] == "cuda" and torch.cuda.is_available() else "cpu"))
    facts["cpu_count"] = os.cpu_count()
    return {
        "machine": facts, "command": args.command, "artifacts": str(args.artifacts),
        "server": {**server, "started_here": args.url is None, "startup_s": startup_s},
        **size, "scale": args.scale, "batch": args.batch, "warmup": args.warmup,
        "requests_per_client": args.requests, "rows": rows, "schema_version": 1,
    }


def _ready_check(check: ReadyCheck, url: str, timeout_s: float, log) -> None:
    """The server answers one request right before anything is measured (``runtime.serve``'s check)."""
    try:
        check.run(url, timeout_s)
    except FlowUpscalerError as exc:
        raise ServingBenchmarkError(f"not measured: {exc}") from None
    log(f"checked: {check.describe()}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    machine, server = result["machine"], result["server"]
    where = machine.get("gpu", f"CPU ({machine['cpu']}, {machine['cpu_count']} cores)")
    backend = server["backend"] + (f" ({server['backend_resolved']})" if server.get("backend_resolved") else "")
    started = (f"started here, ready in {server['startup_s']:.1f} s; the clients share its cores" if server["started_here"]
               else f"running at {server['url']}")
    lines = [
        f"Machine: {where}; torch {machine['torch']}. Command: `{result['command']}`", "",
        (f"Server: {started}. Backend {backend} on {server['device']}, {server['instances']} instance(s), max batch "
         f"{server['max_batch']}, max queue delay {server['max_queue_delay_us']} us."),
        (f"Requests: {result['input_px']} px input (latent {result['latent_side']}x{result['latent_side']}) -> "
         f"{result['output_px']} px, scale {result['scale']}, batch {result['batch']}; per client {result['warmup']} "
         f"warm-up + {result['requests_per_client']} timed, back to back. Latency percentiles over the successful "
         "requests of all clients; rates over the wall time of the timed requests."), "",
        "| clients | requests | errors | wall s | requests/s | latents/s | p50 ms | p90 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['wall_s']:.2f} | {_fmt(r['requests_per_s'], '.3g')} | "
            f"{_fmt(r['latents_per_s'], '.3g')} | {_fmt(r['p50_ms'], '.1f')} | {_fmt(r['p90_ms'], '.1f')} | {_fmt(r['p99_ms'], '.1f')} |"
        )
    for r in result["rows"]:
        for sample in r["error_samples"]:
            lines.append(f"- error with {r['clients']} client(s): {sample}")
    return "\n".join(lines) + "\n"


def _url(text: str) -> str:
    """``host:port`` (an ``http://`` prefix is dropped), checked here: tritonclient fails on a bad one noisily."""
    host, _, port = text.removeprefix("http://").rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port with a port 1..65535 (e.g. 127.0.0.1:8000)")
    return f"{host}:{port}"


def _client_counts(text: str) -> list[int]:
    parse = int_in_range(1, 256)
    counts = [parse(v) for v in text.split(",") if v.strip()]
    if not counts:
        raise argparse.ArgumentTypeError("give at least one client count, e.g. 1,2,4,8 (each 1..256)")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0],
        epilog="Example: python -m benchmarks.serving --artifacts build/rtx5090 --clients 1,2,4,8 --json serving.json",
    )
    parser.add_argument("--artifacts", type=Path, required=True,
                        help="artifact folder: the one served (started here), or a copy of the one --url serves (for its sizes)")
    parser.add_argument("--url", type=_url, help="host:port of a running server's HTTP endpoint (default: start one here on free loopback ports)")
    parser.add_argument("--clients", type=_client_counts, default=[1, 2, 4, 8],
                        help="concurrent client counts, one row each, comma-separated, each 1..256 (default 1,2,4,8)")
    parser.add_argument("--requests", type=int_in_range(1, 100_000), default=20,
                        help="timed requests per client, 1..100000 (default 20)")
    parser.add_argument("--warmup", type=int_in_range(0, 1_000), default=2,
                        help="untimed requests per client before each row's timed ones, 0..1000 (default 2)")
    parser.add_argument("--input-px", type=int_in_range(16, 65536),
                        help="input image side in px, a multiple of 16 inside the folder's range (default: its smallest)")
    parser.add_argument("--scale", type=int, choices=SCALES, default=2, help="upscale factor of every request (default 2)")
    parser.add_argument("--batch", type=int_in_range(1, 1024), default=1, help="latents per request (default 1)")
    parser.add_argument("--request-timeout-s", type=int_in_range(1, 3600), default=600,
                        help="client connection and network timeout per request in s (default 600)")
    started = parser.add_argument_group("server started here (without --url)")
    started.add_argument("--backend", choices=BACKENDS, default="auto", help="runtime backend of every instance (default auto)")
    started.add_argument("--device", choices=DEVICES, default="auto", help="instances on cuda or cpu (default auto: cuda if present)")
    started.add_argument("--max-batch", type=int_in_range(1, 1024),
                         help="largest batch the dynamic batcher forms (default and upper limit: the folder's)")
    started.add_argument("--instances", type=int_in_range(1, 64), default=1, help="model instances (default 1)")
    started.add_argument("--max-queue-delay-us", type=int_in_range(0, 10_000_000), default=0,
                         help="how long a request may wait for others to batch with (default 0, as runtime.serve)")
    started.add_argument("--ready-timeout", type=int_in_range(1, 3600), default=600,
                         help="seconds to wait for the server to load and warm up (default 600)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write a Markdown table")
    return parser


def benchmark_command(argv: list[str] | None = None) -> int:
    """The command; raises the project's exceptions (``main`` turns them into exit codes)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.url:
        given = [flag for flag, dest in (("--max-batch", "max_batch"), ("--backend", "backend"), ("--device", "device"),
                                         ("--instances", "instances"), ("--max-queue-delay-us", "max_queue_delay_us"))
                 if getattr(args, dest) != parser.get_default(dest)]
        if given:
            parser.error(f"{', '.join(given)} configure a server started here; with --url the running server's are used")
    args.command = "python -m benchmarks.serving " + shlex.join(sys.argv[1:] if argv is None else argv)
    for path, flag in ((args.json, "--json"), (args.markdown, "--markdown")):
        if path:
            check_output_file(path, flag, protected=args.artifacts)
    result = run_benchmark(args)
    write_report(result, markdown(result), args.json, args.markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals are one ``error:`` line and exit 1."""
    return run_cli(benchmark_command, argv)


if __name__ == "__main__":
    sys.exit(main())
