"""The upscalers the loader node keeps open across prompts, and the handle it outputs.

ComfyUI caches a node's output while its inputs stay the same, but may drop or keep outputs in
ways the node cannot see (other cache modes, several loaders). So the loader outputs a handle
(``FlowUpscalerModel``: what to load, not the loaded thing), and this registry holds one open
``Upscaler`` per thing loaded: the same inputs reuse it, a rebuilt folder (a new manifest) or a
changed checkpoint file is loaded again, and when a loader node switches to other inputs the
upscaler it used before is closed (unless another loader node uses it too). A handle whose
upscaler was closed loads it again on use.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from engines.manifest import MANIFEST_NAME
from runtime import Upscaler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSpec:
    """What one loader node asks for: a folder or checkpoint, the backend and precision, the device."""

    kind: str  # "folder" or "checkpoint"
    path: Path
    backend: str
    precision: str | None
    device: str

    def stamp(self) -> tuple[int, int, int] | None:
        """What changes when a build replaces the folder's manifest, or the checkpoint file changes."""
        try:
            stat = os.stat(self.path / MANIFEST_NAME if self.kind == "folder" else self.path)
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def memory_needed(self) -> int:
        """Device memory to free before loading and running (the folder's figures; a checkpoint's size)."""
        if self.kind == "folder":
            return Upscaler.memory_needed(self.path)
        return os.stat(self.path).st_size

    def open(self) -> Upscaler:
        precision = self.precision
        if self.kind == "checkpoint":
            return Upscaler.from_checkpoint(self.path, device=self.device, precision=precision)
        return Upscaler.load(self.path, backend=self.backend, device=self.device, precision=precision)


class LoadedUpscalers:
    def __init__(self) -> None:
        self._open: dict[LoadSpec, tuple[object, Upscaler]] = {}
        self._owners: dict[str, LoadSpec] = {}
        self._lock = threading.Lock()

    def get(self, spec: LoadSpec) -> Upscaler:
        """The open upscaler for ``spec``: the one loaded before while its files are unchanged."""
        with self._lock:
            stamp = spec.stamp()
            entry = self._open.get(spec)
            if entry is not None:
                if entry[0] == stamp and not entry[1].closed:
                    return entry[1]
                self._close(spec, "its files changed" if entry[0] != stamp else "it was closed")
            upscaler = spec.open()
            self._open[spec] = (stamp, upscaler)
            logger.info("Flow Upscaler: loaded %s on %s (%s)", spec.path, upscaler.device, upscaler.backend_name)
            return upscaler

    def claim(self, owner: str, spec: LoadSpec) -> None:
        """Loader node ``owner`` now uses ``spec``: what it used before is closed if no other node uses it."""
        with self._lock:
            previous = self._owners.get(owner)
            self._owners[owner] = spec
            if previous is not None and previous != spec and previous not in self._owners.values():
                self._close(previous, "its loader node now loads something else")

    def _close(self, spec: LoadSpec, why: str) -> None:
        entry = self._open.pop(spec, None)
        if entry is not None:
            entry[1].close()
            logger.info("Flow Upscaler: closed %s: %s", spec.path, why)

    def close_all(self) -> None:
        with self._lock:
            for spec in list(self._open):
                self._close(spec, "closing all")
            self._owners.clear()


LOADED = LoadedUpscalers()


@dataclass(frozen=True)
class FlowUpscalerModel:
    """The ``FLOW_UPSCALER`` value passed between nodes: what the loader loaded, opened on use."""

    spec: LoadSpec

    def upscaler(self) -> Upscaler:
        return LOADED.get(self.spec)

    @property
    def decodes(self) -> bool:
        return self.spec.kind == "folder" and "vae_decoder" in self.upscaler().manifest.components

    def __repr__(self) -> str:  # what ComfyUI shows of the value in error reports
        return f"FlowUpscalerModel({self.spec.path}, backend={self.spec.backend}, device={self.spec.device})"
