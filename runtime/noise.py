"""The noise each 2x pass starts from, and the seeds that make it reproducible.

Two sources:
- ``CpuNoise``, the cross-backend convention: a CPU ``torch.Generator`` seeded with the seed; pass
  k draws its [B, 32, 2h, 2w] fp32 noise as ``torch.randn`` does, after passes 0..k-1 drew
  theirs. Identical on every device and backend, and what the reference, the accuracy gate and
  the tests use. On a CUDA device it is drawn ahead on a worker thread into pinned memory and
  copied without blocking, so the drawing overlaps the GPU's work.
- ``DeviceNoise``: the same sequence rules with a CUDA generator on the device, no host work at
  all. Reproducible for a seed on the same GPU model (SM count) and torch version; other GPUs
  draw other numbers.

Seeds: an int seeds one generator for the whole batch (the batch draws together). A list gives
each batch item its own generator, so item i gets exactly the noise it gets alone with seed
``seeds[i]``: a server can batch requests without changing anyone's result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, Future

import torch

from .latents import LATENT_CHANNELS

Seeds = int | Sequence[int]
NOISE_MODES = ("auto", "cpu", "device")


def pass_noise_shape(latents_small_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """The noise of the pass that upscales ``latents_small``: the output's shape."""
    b, _, h, w = latents_small_shape
    return (b, LATENT_CHANNELS, 2 * h, 2 * w)


def chain_noise_shapes(batch: int, height: int, width: int, passes: int) -> list[tuple[int, int, int, int]]:
    """The noise shapes of ``passes`` chained passes on a [batch, 32, height, width] input."""
    return [(batch, LATENT_CHANNELS, height * 2 ** (k + 1), width * 2 ** (k + 1)) for k in range(passes)]


class Noise(ABC):
    """The noise of successive passes of one call."""

    @abstractmethod
    def next_pass(self, latents_small: torch.Tensor) -> torch.Tensor:
        """The next pass's noise, fp32 on ``latents_small``'s device, shaped ``pass_noise_shape``."""


def _generators(seeds: Seeds, device: torch.device | str) -> list[torch.Generator]:
    items = [seeds] if isinstance(seeds, int) else list(seeds)
    return [torch.Generator(device).manual_seed(seed) for seed in items]


def _fill(out: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """``out`` filled as ``torch.randn`` fills it: by one generator, or item by item."""
    if len(generators) == 1:
        return out.normal_(generator=generators[0])
    if len(generators) != out.shape[0]:
        raise ValueError(f"{len(generators)} seeds for a batch of {out.shape[0]}")
    for item, generator in zip(out, generators):
        item.normal_(generator=generator)
    return out


class CpuNoise(Noise):
    """The cross-backend convention (see the module docstring).

    ``ahead``: the shapes of the passes to come, when known; with an ``executor`` and a CUDA
    ``device`` they are drawn in order on the executor into pinned memory as soon as the object
    exists, and each ``next_pass`` only waits for its own and starts a non-blocking copy.
    """

    def __init__(
        self,
        seeds: Seeds,
        device: torch.device | str = "cpu",
        ahead: Sequence[tuple[int, ...]] = (),
        executor: Executor | None = None,
    ):
        self._generators = _generators(seeds, "cpu")
        self._device = torch.device(device)
        self._pending: deque[tuple[tuple[int, ...], Future]] = deque()
        if executor is not None and self._device.type == "cuda":
            for shape in ahead:
                self._pending.append((tuple(shape), executor.submit(self._draw, tuple(shape), True)))

    def _draw(self, shape: tuple[int, ...], pinned: bool) -> torch.Tensor:
        return _fill(torch.empty(shape, dtype=torch.float32, pin_memory=pinned), self._generators)

    def next_pass(self, latents_small: torch.Tensor) -> torch.Tensor:
        shape = pass_noise_shape(latents_small.shape)
        if self._pending:
            drawn_for, future = self._pending.popleft()
            if drawn_for != shape:
                raise RuntimeError(f"noise was drawn ahead for {drawn_for}, but the pass needs {shape}")
            return future.result().to(latents_small.device, non_blocking=True)
        return self._draw(shape, pinned=False).to(latents_small.device)


class DeviceNoise(Noise):
    """Noise drawn by CUDA generators on the device (see the module docstring)."""

    def __init__(self, seeds: Seeds, device: torch.device | str):
        self._device = torch.device(device)
        self._generators = _generators(seeds, self._device)

    def next_pass(self, latents_small: torch.Tensor) -> torch.Tensor:
        out = torch.empty(pass_noise_shape(latents_small.shape), dtype=torch.float32, device=latents_small.device)
        return _fill(out, self._generators)
