"""One 2x pass, the rule every path shares (MODEL.md 2): the conditioning encoder at t = 1000, the
U-Net's velocity at the noise, then one flow-match Euler step from sigma 1 to 0, ``x0 = noise - v``
in fp32. The runtime, the eager reference, the check set, calibration and the benchmarks all
import it from here (it is on the runtime side, which the export side may import)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

TIMESTEP = 1000.0
PASS_COMPONENTS = ("cond_encoder", "unet")  # the graphs (and engines) one pass runs, in order


class NoiseSource(Protocol):
    def next_pass(self, latents_small: torch.Tensor) -> torch.Tensor: ...


def timesteps(batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The encoder's ``timestep`` input for a batch: fp32, every item at t = 1000."""
    return torch.full((batch,), TIMESTEP, dtype=torch.float32, device=device)


def x0_from_velocity(noise: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The Euler step from sigma 1 to 0, in fp32 whatever precision the velocity came in."""
    return noise.float() - velocity.float()


def run_pass(run: Callable[[str, dict], dict], latents_small: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
    """One pass through ``run(component, inputs) -> outputs`` (a backend's, or any graphs').

    The noise is fetched after the encoder is launched: on a GPU the encoder runs meanwhile.
    """
    encoded = run("cond_encoder", {"latents_small": latents_small,
                                   "timestep": timesteps(latents_small.shape[0], latents_small.device)})
    sample = noise.next_pass(latents_small)
    velocity = run("unet", {"sample": sample, **encoded})["velocity"]
    return x0_from_velocity(sample, velocity)
