"""The one place where the command-line tools turn errors into messages and exit codes.

- A ``FlowUpscalerError`` (the base of every error the project raises on purpose) or an error of
  the operating system (a file that cannot be read or written) is expected: one line
  ``error: <message>`` on stderr, exit 1. Those messages already name the problem and the fix.
- Ctrl-C: one line, exit 130 (what was there before is left whole: builds and outputs are
  transactional).
- Anything else is a bug: the traceback, a line asking for a report, exit 70 (EX_SOFTWARE).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from .errors import FlowUpscalerError

EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 1, 70, 130


def is_expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a refusal the project explains, rather than a bug."""
    return isinstance(exc, (FlowUpscalerError, OSError))


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return " ".join(str(exc).split()) or type(exc).__name__


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI's ``main`` and map what escapes it to a message and an exit code."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted; what was there before is unchanged", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except Exception as exc:  # the single place that decides what is a refusal and what is a bug
        if is_expected(exc):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_ERROR
        traceback.print_exc()
        print(
            "error: an unexpected failure (a bug in this toolkit); please report it with the command "
            "and the traceback above",
            file=sys.stderr,
        )
        return EXIT_BUG


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes (negatives alias seed + 2**64)


def int_in_range(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``lo`` to ``hi``, refused with the range otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer (accepted: {lo}..{hi})") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside the accepted range {lo}..{hi}")
        return value

    return parse


def float_in_range(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse ``type``: a number with ``lo < value <= hi``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (accepted: more than {lo:g}, up to {hi:g})") from None
        if not lo < value <= hi:
            raise argparse.ArgumentTypeError(f"{value:g} is outside the accepted range: more than {lo:g}, up to {hi:g}")
        return value

    return parse
