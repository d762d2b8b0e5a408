"""``python -m runtime.check FOLDER``: run an artifact folder's check set through a backend here.

Loads the folder as the runtime does (``Upscaler.load``: the manifest's checks, the backend, and on
first use of engines that never ran, the runtime's own check), then runs every component on its
stored cases (three calls each: the last replays a CUDA graph where the backend captures one) and
one whole 2x pass, and prints each output's worst rel-L2 and max-abs against the fp32 eager outputs
the build stored, with the limits stored beside them, and which profiles' largest shapes were
checked smaller or not at all (the build's size budget). Exit 0 when everything ran and
passed; 1 when anything failed or cannot run here (a bf16 graph on ONNX Runtime's CPU provider,
no GPU for TensorRT), with one line saying why. With ``--backend onnxruntime`` it runs on a CPU,
which is how CI shows that a build's check set is right.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.cli import run_cli

from .checkset import run_check_set
from .upscale import _log_to_stderr
from .inputs import resolve_device
from .selection import BACKENDS
from .upscaler import Upscaler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.check",
        description="Run an artifact folder's check set (inputs and fp32 eager outputs stored by the build) through "
                    "a backend on this machine and print each output's errors against its limits. Exit 0: all "
                    "passed; 1: a failure, or something cannot run here (the line says why).",
    )
    parser.add_argument("artifacts", type=Path, help="artifact folder (with manifest.json)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="what runs the check (default auto: what the runtime would use here)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    return parser


def check_command(argv: list[str] | None = None) -> int:
    """The command; raises the project's exceptions (``main`` turns them into exit codes)."""
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device, "--device")
    with Upscaler.load(args.artifacts, backend=args.backend, device=device) as upscaler:
        result = run_check_set(upscaler.backend, upscaler.folder, upscaler.manifest)
        skipped = upscaler.skipped_backends
    print(f"{args.artifacts}: check set {result.check_set} on {result.backend} ({result.device}), "
          "against the fp32 eager outputs stored at build time")
    for kind, why in skipped.items():
        print(f"  (auto skipped {kind}: {why})")
    for line in result.lines():
        print(f"  {line}")
    for note in (*result.notes, *result.coverage):
        print(f"  note: {note}")
    if result.passed:
        print(f"PASS: {len(result.outputs)} outputs within their limits on every call")
        return 0
    print(f"FAIL: {'; '.join(result.failures)}")
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the command as on the command line: refusals are one ``error:`` line and exit 1."""
    return run_cli(check_command, argv)


if __name__ == "__main__":
    _log_to_stderr()
    sys.exit(main())
