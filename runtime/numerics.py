"""True fp32 for code that calls itself the fp32 reference.

PyTorch lets cuDNN convolutions run fp32 in TF32 by default (10-bit mantissa), and an app may
allow it for matmuls too; oneDNN can be told to use bf16 or TF32 for fp32 on the CPU. The
reference, the torch backend's fp32 mode, the accuracy gate and the ``eager-fp32`` benchmark run
inside ``full_fp32()``, which asks every backend for IEEE fp32 and restores what was set before.

The switches are process-wide: while a scope is open, other threads' fp32 work is IEEE too.
Nested and concurrent scopes are counted, so the settings come back only when the last one ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.Lock()
_depth = 0
_saved: dict[tuple[object, str], object] = {}


def _switches() -> list[tuple[object, str]]:
    """(object, attribute) of every fp32 precision switch this torch has (the 2.9+ API)."""
    backends = torch.backends
    owners = [
        getattr(backends.cuda, "matmul", None),
        getattr(getattr(backends, "cudnn", None), "conv", None),
        getattr(getattr(backends, "cudnn", None), "rnn", None),
        getattr(getattr(backends, "mkldnn", None), "matmul", None),
        getattr(getattr(backends, "mkldnn", None), "conv", None),
        getattr(getattr(backends, "mkldnn", None), "rnn", None),
    ]
    return [(owner, "fp32_precision") for owner in owners if owner is not None and hasattr(owner, "fp32_precision")]


def _legacy_switches() -> list[tuple[object, str]]:
    """The pre-2.9 TF32 switches, for a torch without ``fp32_precision``."""
    return [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]


def _target() -> tuple[list[tuple[object, str]], object]:
    switches = _switches()
    return (switches, "ieee") if switches else (_legacy_switches(), False)


@contextmanager
def full_fp32() -> Iterator[None]:
    """Run the block with TF32 (and oneDNN's reduced fp32 modes) off; restore the settings after."""
    global _depth
    switches, value = _target()
    with _lock:
        if _depth == 0:
            _saved.clear()
            for owner, attribute in switches:
                _saved[(owner, attribute)] = getattr(owner, attribute)
                setattr(owner, attribute, value)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for (owner, attribute), previous in _saved.items():
                    setattr(owner, attribute, previous)
                _saved.clear()

