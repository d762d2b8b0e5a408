"""What every backend is: one small interface (``Backend``) that runs a component by name on named
tensors and returns named tensors on its device, and ``OwnStream`` for backends with a CUDA stream
of their own. A backend knows the artifact folder's components, not the pipeline: chaining, noise
and tiling live in ``runtime.upscaler``; how each opens, in ``runtime.selection``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import ContextManager

import torch

from ..errors import BackendUnavailable

Tensors = dict[str, torch.Tensor]
__all__ = ["Backend", "BackendUnavailable", "OwnStream", "Tensors"]


class Backend(ABC):
    name: str
    device: torch.device

    @abstractmethod
    def run(self, component: str, inputs: Tensors) -> Tensors:
        """Run ``component`` on ``inputs`` (on ``self.device``); outputs by name, on the same device."""

    def check(self, component: str) -> None:
        """Raise ``BackendUnavailable`` if ``component`` cannot run here (checked before any work)."""

    def memory_bytes(self) -> int:
        """Device memory this backend holds (weights and scratch); 0 when it runs on the host."""
        return 0

    def on_stream(self) -> ContextManager[torch.cuda.Stream | None]:
        """Run the block on the backend's own CUDA stream, if it has one; yields the caller's stream.

        Work in the block is ordered after the caller's earlier work and before its later work, so a
        caller (the ``Upscaler``) can run a whole call there. Backends without a stream of their own
        run on the caller's and yield None.
        """
        return nullcontext()

    def fused_pass(self, latents_small: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """``(latents_small, noise) -> x0`` running a whole 2x pass as one unit (a compiled graph),
        if the backend has one for these inputs; None: the pipeline calls ``run`` per component."""
        return None

    def close(self) -> None:
        """Free what the backend holds; it cannot run afterwards."""

    def run_precision(self, component: str) -> str | None:
        """The float precision this backend runs ``component`` in when it is not the folder's graph's
        own (the torch backend's modes); None: as built. The check set holds it to that precision's
        limits (``runtime.checkset``)."""
        return None

    def verification_identity(self) -> dict | None:
        """What makes this backend's results on this machine its own (engine hashes, GPU, driver,
        runtime version), for backends whose engines were built where they could not run: the
        runtime checks them on first use against the folder's check set and caches the verdict under
        a hash of this (``runtime.checkset``). None: nothing to check (graphs and eager models run
        as built and validated)."""
        return None


class OwnStream:
    """A backend's CUDA stream, ordered against the caller's current stream with events.

    Entering waits (on the GPU, not the host) for the caller's stream, makes the backend stream
    current under a device guard, and on exit makes the caller's stream wait for the backend's.
    One stream for all of a backend's work serialises it on the GPU, so buffers the backend
    reuses are never written by one call while another call still reads them. Nested scopes are free.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    @contextmanager
    def scope(self) -> Iterator[torch.cuda.Stream | None]:
        caller = torch.cuda.current_stream(self.device)
        if caller == self.stream:
            yield None
            return
        self.stream.wait_stream(caller)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                yield caller
        finally:
            caller.wait_stream(self.stream)

