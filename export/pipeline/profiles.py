"""The profiles stage: each component's optimisation profiles, derived from the target's
resolution range and memory budget, and the memory estimate at each profile's maximum.

Not reused: the derivation takes a second and its result is part of the engine's key.
"""

from __future__ import annotations

import time
from pathlib import Path

from engines.memory import GraphMemoryModel
from engines.profiles import VAE_TILE_CAP, Profile, ProfileError, pass_profiles, tile_profile
from engines.targets import Target
from export.onnx.components import COMPONENTS, Models

from .progress import StageLog
from .settings import BuildSettings

PIXELS_PER_LATENT = 8


def latent_ranges(target: Target) -> dict[str, tuple[int, int, int]]:
    """(smallest side, largest side, grid) of each component's main input, in latent pixels.

    The first pass takes ``min_input_px`` images; the last one outputs ``max_output_px``.
    """
    lo_small = target.min_input_px // PIXELS_PER_LATENT
    hi_sample = target.max_output_px // PIXELS_PER_LATENT
    return {
        "cond_encoder": (lo_small, hi_sample // 2, COMPONENTS["cond_encoder"].grid),
        "unet": (2 * lo_small, hi_sample, COMPONENTS["unet"].grid),
        "vae_decoder": (lo_small, hi_sample, COMPONENTS["vae_decoder"].grid),
    }


def check_range(target: Target) -> None:
    """Sizes on every component's grid: inputs a multiple of 16 px, outputs of 32 px (latents
    of 2 and 4), and at least one 2x pass between them."""
    lo, hi = target.min_input_px, target.max_output_px
    in_step = PIXELS_PER_LATENT * COMPONENTS["cond_encoder"].grid
    out_step = PIXELS_PER_LATENT * COMPONENTS["unet"].grid
    if lo <= 0 or lo % in_step or hi % out_step or hi < 2 * lo:
        raise ProfileError(
            f"resolution range {lo}..{hi} px is not usable: the smallest input side must be a positive "
            f"multiple of {in_step} px, the largest output side a multiple of {out_step} px and at least "
            "twice the input"
        )


def derive_profiles(
    component: str, models: Models, memory: GraphMemoryModel, settings: BuildSettings
) -> tuple[list[Profile], list[int]]:
    """The component's profiles, and the memory estimate at each profile's maximum."""
    spec = COMPONENTS[component]
    lo, hi, grid = latent_ranges(settings.target)[component]

    def rule(batch: int, h: int, w: int):
        return spec.input_shapes(models, batch, h, w)

    def estimate(shapes) -> int:
        return memory.estimate(dict(shapes)).total

    budget = settings.target.memory_budget_bytes
    if component == "vae_decoder":
        cap = min(VAE_TILE_CAP, hi)
        profiles = [tile_profile(rule, lo, grid, budget, estimate, cap, settings.max_batch, component)]
    else:
        profiles = pass_profiles(rule, lo, hi, grid, budget, estimate, settings.max_batch, component)
    return profiles, [estimate(p.max) for p in profiles]


def format_profile(profile: Profile, main_input: str) -> str:
    def side(shape):
        return f"{shape[2]}x{shape[3]}"

    lo, opt, hi = profile.min[main_input], profile.opt[main_input], profile.max[main_input]
    return f"{profile.name}: {main_input} {side(lo)} .. {side(hi)} (opt {side(opt)}), batch 1..{hi[0]}"


class DeriveProfiles:
    """Profiles stage. In: the component's validated graph (for the memory model) and the settings'
    target and batch limit. Out: the profiles and their memory estimates."""

    def __init__(self, component: str, models: Models, settings: BuildSettings, progress: StageLog):
        self.component, self.models, self.settings, self.progress = component, models, settings, progress

    def __call__(self, graph: Path) -> tuple[list[Profile], list[int]]:
        start = time.perf_counter()
        profiles, estimates = derive_profiles(self.component, self.models, GraphMemoryModel(graph), self.settings)
        self.progress.finished(self.component, "profiles", start, reused=False, count=len(profiles))
        for profile, estimate in zip(profiles, estimates):
            self.progress(f"    {format_profile(profile, COMPONENTS[self.component].inputs[0])}, "
                          f"estimate {estimate / 2**30:.2f} GiB")
        return profiles, estimates
