"""``python -m runtime.serve``: serve an artifact folder as the model ``flow_upscaler`` on a real
Triton Inference Server (KServe v2 HTTP and gRPC, dynamic batching, metrics), or write the model
repository for a stock Triton server (``--write-repository``).

Everything that can be refused is refused before the server starts (folder, ports, batch size).
The server is ready only once every model instance loaded the folder and ran one warm-up pass, and
one real request through it came back equal to ``Upscaler``'s answer (``serving.ready``). SIGTERM
or SIGINT stops it: Triton finishes in-flight requests (within ``--exit-timeout``), then the
command exits 0. A first start that fails or answers wrongly is stopped, and the command exits 1
saying why. A server that dies while serving is restarted on the same ports and checked again
(``serving.supervisor``); after ``--max-crashes`` deaths within ``--crash-window`` the command
exits 1. With a ``--host`` other than loopback only gRPC listens there: HTTP and metrics stay on
127.0.0.1 (one crafted HTTP/JSON request aborts the bundled Triton) unless ``--public-http``.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import time
from pathlib import Path

from engines.cli import int_in_range, run_cli

from .noise import NOISE_MODES
from .serving.repository import MODEL_NAME, ServedModel, write_repository
from .serving.ready import ReadyCheck
from .serving.server import (
    EXIT_TIMEOUT_S,
    Hosts,
    Ports,
    check_ports_free,
    http_body_limit,
    is_loopback,
)
from .serving.supervisor import FIRST_DELAY_S, MAX_DELAY_S, RestartPolicy, Service
from .serving.supervisor import logger as supervisor_logger
from .errors import InvalidArgumentError
from .selection import BACKENDS

DEVICES = ("auto", "cpu", "cuda")
PORT = int_in_range(1, 65535)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.serve",
        description=(
            f"Serve an artifact folder as the Triton model '{MODEL_NAME}': inputs latents FP32 [batch, 32, h, w] "
            "(normalised FLUX.2 latents), scale INT32 [batch, 1] (2, 4 or 8), seed INT64 [batch, 1], optional "
            "decode BOOL [batch, 1]; outputs upscaled FP32 [batch, 32, h*scale, w*scale] and, for decode=true, "
            "image UINT8 [batch, 8*h*scale, 8*w*scale, 3] (RGB). Each request's result equals "
            "Upscaler.upscale(latents, scale, seed=[its seeds]) with the same backend, whatever it is batched with."
        ),
        epilog="Runs the tritonserver bundled with nvidia-pytriton (the serve extra). GPU deployments: write the "
        "repository with --device cuda --write-repository DIR and run it in NGC's tritonserver container (runtime/README.md, Serving).",
    )
    parser.add_argument("artifacts", type=Path, help="artifact folder (with manifest.json) from python -m export.build")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="runtime backend of every instance (default: auto)")
    parser.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="cuda: instances on GPUs (Triton KIND_GPU, --instances per GPU); cpu: KIND_CPU; auto: cuda if this "
        "machine has one, else cpu",
    )
    parser.add_argument("--noise", choices=NOISE_MODES, default="auto", help="noise mode of the upscalers (see Upscaler.load)")
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address gRPC listens on (default: 127.0.0.1, this machine only; 0.0.0.0: all); with an address other "
        "than loopback, HTTP and metrics stay on 127.0.0.1 unless --public-http",
    )
    parser.add_argument(
        "--public-http", action="store_true",
        help="with a --host other than loopback, let HTTP (inference) and metrics listen there too. RISK: anyone who "
        "reaches the HTTP port can abort the bundled Triton 2.51 with one crafted HTTP/JSON request of ~250 bytes (a "
        "huge declared shape); it is restarted (requests in flight fail, seconds of downtime) until --max-crashes. "
        "Put HTTP behind a gateway that authenticates clients instead",
    )
    parser.add_argument("--http-port", type=PORT, default=8000)
    parser.add_argument("--grpc-port", type=PORT, default=8001)
    parser.add_argument("--metrics-port", type=PORT, default=8002, help="Prometheus metrics at /metrics")
    parser.add_argument(
        "--max-batch", type=int_in_range(1, 1024),
        help="largest batch the dynamic batcher forms, in latents over all requests batched (default and upper "
        "limit: the folder's largest profile batch)",
    )
    parser.add_argument("--max-queue-delay-us", type=int_in_range(0, 10_000_000), default=0,
                        help="how long a request may wait for others to batch with (default: 0: requests that "
                        "queue while an instance is busy are still batched; a delay adds its length to a lone "
                        "client's latency, measured: 2000 us cost a lone small-folder client ~2 ms on a CPU)")
    parser.add_argument("--instances", type=int_in_range(1, 64), default=1,
                        help="model instances (each its own process and Upscaler; per GPU with --device cuda)")
    parser.add_argument("--ready-timeout", type=int_in_range(1, 3600), default=600,
                        help="seconds to wait for the folder to load and warm up (default: 600)")
    parser.add_argument("--exit-timeout", type=int_in_range(0, 3600), default=EXIT_TIMEOUT_S,
                        help="seconds Triton waits on SIGTERM for clients' connections and in-flight requests "
                        f"(default: {EXIT_TIMEOUT_S}; raise it for long requests)")
    parser.add_argument("--max-crashes", type=int_in_range(1, 1000), default=RestartPolicy.max_crashes,
                        help="give up (exit 1) when Triton dies this many times within --crash-window; each earlier "
                        f"death is restarted after a back-off of {FIRST_DELAY_S:g} s doubling per recent crash up to "
                        f"{MAX_DELAY_S:g} s (default: {RestartPolicy.max_crashes}; 1: never restart)")
    parser.add_argument("--crash-window", type=int_in_range(1, 86_400), default=int(RestartPolicy.window_s),
                        metavar="SECONDS", help="the window --max-crashes counts in, seconds (default: "
                        f"{RestartPolicy.window_s:g})")
    parser.add_argument("--verbose", action="store_true", help="print Triton's whole log (default: only this model's lines)")
    parser.add_argument(
        "--write-repository", type=Path, metavar="DIR",
        help="write the model repository (DIR/flow_upscaler: config.pbtxt, 1/model.py) for a stock Triton server "
        "and exit, without serving",
    )
    parser.add_argument("--copy-artifacts", action="store_true",
                        help="with --write-repository: copy the folder into the repository (else it is named by absolute path)")
    return parser


def served_model(args: argparse.Namespace) -> ServedModel:
    if args.copy_artifacts and args.write_repository is None:
        raise InvalidArgumentError("--copy-artifacts goes with --write-repository DIR")
    return ServedModel.for_folder(
        args.artifacts, backend=args.backend, device=args.device, noise=args.noise, instances=args.instances,
        max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us,
    )


class _StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGINT, raised in the main thread wherever it waits, so the server is stopped once."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _StopRequested(signal.Signals(signum).name)


def serve(model: ServedModel, host: str, ports: Ports, ready_timeout: float, exit_timeout: int, verbose: bool,
          public_http: bool = False, policy: RestartPolicy = RestartPolicy()) -> int:
    """Serve until SIGTERM/SIGINT (exit 0), restarting Triton when it dies (``Service.watch``);
    raises ``ServeError`` if the first start fails or answers the ready check wrongly, and
    ``CrashLoop`` once the restarts give up (the server is stopped either way)."""
    kind = "GPU" if model.gpu else "CPU"
    hosts = Hosts.for_host(host, public_http)
    check_ports_free(hosts, ports)  # the cheap refusals first: the ready check's answer takes a load of the folder
    print(f"{MODEL_NAME}: serving {model.artifacts} with backend {model.backend} on {kind} ({model.instances} "
          f"instance(s), max batch {model.max_batch}); computing the ready check's answer...", flush=True)
    check = ReadyCheck.against_upscaler(model)  # before Triton: never two copies of the folder on a GPU
    service = Service(model, check, host, ports, ready_timeout_s=ready_timeout, exit_timeout_s=exit_timeout,
                      public_http=public_http, echo=_Echo(verbose), policy=policy)
    print(f"starting Triton (HTTP request bodies up to {http_body_limit(service.stack_bytes) / 1e6:.0f} MB: a larger "
          f"one crashes Triton 2.51; gRPC takes any; restarted when it dies, giving up after {policy.max_crashes} "
          f"death(s) within {policy.window_s:g} s)...", flush=True)
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {number: signal.signal(number, _raise_stop) for number in signals}
    printing = _print_supervisor()
    stopped_by = None
    try:
        seconds = service.start()
        listening = service.server.listening()
        print(f"ready in {seconds:.1f} s ({check.describe()}): HTTP http://{listening['HTTP']}/v2/models/{MODEL_NAME}, "
              f"gRPC {listening['gRPC']}, metrics http://{listening['metrics']}/metrics (SIGTERM or Ctrl-C stops)",
              flush=True)
        print(_exposure(host, hosts, listening), flush=True)
        service.watch()
    except _StopRequested as stop:
        stopped_by = str(stop)
        print(f"stopping ({stopped_by}): Triton finishes in-flight requests, up to {exit_timeout} s "
              "(a second signal kills it now)...", flush=True)
    finally:
        for number in signals:  # a second signal while stopping: kill now, still clean up
            signal.signal(number, lambda *_: service.kill())
        start = time.monotonic()
        try:
            code = service.stop()
        finally:
            supervisor_logger.removeHandler(printing)
            for number, handler in previous.items():
                signal.signal(number, handler)
    note = " (its exit timeout expired: clients kept connections open or requests ran long)" if code == 1 else ""
    print(f"stopped in {time.monotonic() - start:.1f} s, Triton exit code {code}{note}", flush=True)
    return 0


def _exposure(host: str, hosts: Hosts, listening: dict[str, str]) -> str:
    """Who can reach what, in one line."""
    if is_loopback(host):
        return f"listening on {host}: this machine only"
    if hosts.http == hosts.grpc:
        return (f"warning: --public-http: HTTP {listening['HTTP']} and metrics {listening['metrics']} are reachable "
                "from other machines, and one crafted HTTP/JSON request (a huge declared shape) aborts the bundled "
                "Triton 2.51 (it is restarted; requests in flight are lost); let untrusted clients reach gRPC only, or "
                "HTTP only through a gateway (runtime/README.md, Serving)")
    return (f"gRPC {listening['gRPC']} is reachable from other machines; HTTP {listening['HTTP']} and metrics "
            f"{listening['metrics']} from this machine only (the bundled Triton 2.51 aborts on one crafted HTTP/JSON "
            "request; --public-http publishes them at that risk)")


def _print_supervisor() -> logging.Handler:
    """Print the supervisor's log (crashes, restarts) as the command's own lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    supervisor_logger.addHandler(handler)
    return handler


class _Echo:
    """What of Triton's log the command prints: this model's lines (with their continuation lines,
    a traceback's), or everything with --verbose."""

    LOG_PREFIX = re.compile(r"^[IWEF]\d{4} ")  # Triton's line header: level, month, day

    def __init__(self, verbose: bool):
        self.verbose, self.printing = verbose, False

    def __call__(self, line: str) -> None:
        if self.LOG_PREFIX.match(line):
            self.printing = f"{MODEL_NAME} ready" in line or f"{MODEL_NAME}:" in line
        if self.verbose or self.printing:
            print(f"triton: {line}", flush=True)


def serve_command(argv: list[str] | None = None) -> int:
    """The command; raises the project's exceptions (``main`` turns them into exit codes)."""
    args = build_parser().parse_args(argv)
    if args.public_http and is_loopback(args.host):
        raise InvalidArgumentError(f"--public-http goes with a --host other than loopback (got {args.host}: HTTP "
                                   "already listens there)")
    model = served_model(args)
    if args.write_repository is not None:
        folder = write_repository(args.write_repository, model, copy_artifacts=args.copy_artifacts)
        print(f"wrote {folder} (config.pbtxt, {folder.name}/1/model.py); serve it with: tritonserver "
              f"--model-repository {folder.parent.resolve()}")
        return 0
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    policy = RestartPolicy(max_crashes=args.max_crashes, window_s=args.crash_window)
    return serve(model, args.host, ports, args.ready_timeout, args.exit_timeout, args.verbose, args.public_http, policy)


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals are one ``error:`` line and exit 1."""
    return run_cli(serve_command, argv)


if __name__ == "__main__":
    sys.exit(main())
