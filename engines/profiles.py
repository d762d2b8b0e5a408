"""TensorRT optimisation profiles derived from a target's resolution range and memory budget.

Pure Python, so the runtime and the tests can reason about profiles without TensorRT. A profile
gives min/opt/max shapes for every input of one engine; a component is described to this module
only by a shape rule ``(batch, height, width) -> {input name: shape}`` over its main spatial
input, so nothing here knows the models.

Why several profiles: TensorRT picks tactics for the ``opt`` shape, and one profile spanning
128 to 1024 latent pixels (a 64x range in area) would run the common first pass with tactics
tuned for a size 16 times larger. Chained 2x passes land on octave sizes (128, 256, 512, 1024),
so there is one profile per octave, tuned at its upper end, and each profile's batch limit is
what the memory budget allows at its largest shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import FlowUpscalerError

Shape = tuple[int, ...]
Shapes = Mapping[str, Shape]
ShapeRule = Callable[[int, int, int], dict[str, Shape]]
MemoryEstimator = Callable[[Shapes], int]

MAX_BATCH = 4
# The VAE's mid-block attention grows with the square of a tile's area; a 128-latent (1024 px)
# tile keeps it small and still decodes a single-pass 1024 px output in one tile.
VAE_TILE_CAP = 128


class ProfileError(FlowUpscalerError, ValueError):
    """A resolution range that cannot be covered within the memory budget."""


@dataclass(frozen=True)
class Profile:
    name: str
    min: dict[str, Shape]
    opt: dict[str, Shape]
    max: dict[str, Shape]

    def admits(self, name: str, shape: Shape) -> bool:
        """Whether ``shape`` lies inside this profile's min..max box for input ``name``."""
        lo, hi = self.min.get(name), self.max.get(name)
        return lo is not None and len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))

    def covers(self, shapes: Shapes) -> bool:
        """Whether every input's shape is given and lies inside this profile's box."""
        return set(shapes) == set(self.min) and all(self.admits(n, s) for n, s in shapes.items())

    @property
    def max_batch(self) -> int:
        return max(shape[0] for shape in self.max.values())

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": {
                n: {"min": list(self.min[n]), "opt": list(self.opt[n]), "max": list(self.max[n])}
                for n in self.min
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Profile:
        inputs = data["inputs"]
        return cls(
            name=data["name"],
            **{k: {n: tuple(v[k]) for n, v in inputs.items()} for k in ("min", "opt", "max")},
        )


def select_profile(profiles: list[Profile], shapes: Shapes) -> int | None:
    """Index of the profile with the smallest maximum that covers ``shapes`` (None if none does).

    What the TensorRT backend runs: every input of the engine must be given.
    """
    return _smallest([i for i, p in enumerate(profiles) if p.covers(shapes)], profiles)


def admitting_profile(profiles: list[Profile], name: str, shape: Shape) -> int | None:
    """Like ``select_profile`` for one input: what callers that know only the main input check."""
    return _smallest([i for i, p in enumerate(profiles) if p.admits(name, shape)], profiles)


def _smallest(indices: list[int], profiles: list[Profile]) -> int | None:
    if not indices:
        return None
    return min(indices, key=lambda i: sum(_volume(s) for s in profiles[i].max.values()))


def _volume(shape: Shape) -> int:
    volume = 1
    for size in shape:
        volume *= size
    return volume


def _check_side_range(lo: int, hi: int, grid: int) -> None:
    if lo <= 0 or lo % grid or hi % grid:
        raise ProfileError(f"sizes must be positive multiples of {grid}, got {lo}..{hi}")
    if hi < lo:
        raise ProfileError(f"the largest size ({hi}) is below the smallest ({lo})")


def octave_sides(lo: int, hi: int, grid: int) -> list[int]:
    """Upper sides of the octaves from ``lo`` to ``hi``: lo, 2lo, 4lo, ... and hi itself.

    A last step of less than half an octave stretches the previous octave instead of adding a
    sliver profile (124 -> 1024 gives 124, 248, 496, 1024, not ..., 992, 1024).
    """
    _check_side_range(lo, hi, grid)
    sides, side = [], lo
    while side < hi:
        sides.append(side)
        side *= 2
    if len(sides) > 1 and 2 * hi < 3 * sides[-1]:
        sides[-1] = hi
    else:
        sides.append(hi)
    return sides


def _batch_limit(rule: ShapeRule, side: int, budget: int, estimate: MemoryEstimator, cap: int) -> int:
    """Largest batch up to ``cap`` whose estimate at a square ``side`` fits ``budget`` (0 if none)."""
    batch = cap
    while batch and estimate(rule(batch, side, side)) > budget:
        batch -= 1
    return batch


def _over_budget(component: str, side: int, needed: int, budget: int, hint: str) -> ProfileError:
    gib = 1 << 30
    return ProfileError(
        f"{component} at batch 1 and {side}x{side} latent pixels needs about {needed / gib:.1f} GiB, over the "
        f"memory budget of {budget / gib:.1f} GiB; {hint}"
    )


def pass_profiles(
    rule: ShapeRule,
    lo: int,
    hi: int,
    grid: int,
    budget: int,
    estimate: MemoryEstimator,
    max_batch: int = MAX_BATCH,
    component: str = "component",
) -> list[Profile]:
    """One profile per octave of the main input's side, ``lo``..``hi`` on ``grid``.

    Profile k accepts any height and width from ``lo`` to its side s_k (any aspect ratio within
    that box), is tuned at s_k x s_k with batch 1, and allows the largest batch that fits.
    """
    profiles = []
    for side in octave_sides(lo, hi, grid):
        batch = _batch_limit(rule, side, budget, estimate, max_batch)
        if batch == 0:
            raise _over_budget(
                component, side, estimate(rule(1, side, side)), budget,
                "lower the largest output size (--max-px) or build for a target with more memory",
            )
        profiles.append(
            Profile(
                name=f"{component}:{side}",
                min=rule(1, lo, lo),
                opt=rule(1, side, side),
                max=rule(batch, side, side),
            )
        )
    return profiles


def tile_profile(
    rule: ShapeRule,
    lo: int,
    grid: int,
    budget: int,
    estimate: MemoryEstimator,
    cap: int = VAE_TILE_CAP,
    max_batch: int = MAX_BATCH,
    component: str = "component",
) -> Profile:
    """One profile for tiled decoding: any size from ``lo`` up to the largest tile that fits.

    The tile side is the largest multiple of ``grid`` from ``lo`` to ``cap`` whose batch-1
    estimate fits the budget; larger outputs are decoded in overlapping tiles of that size.
    """
    _check_side_range(lo, cap, grid)
    tile = next(
        (side for side in range(cap - cap % grid, lo - 1, -grid) if estimate(rule(1, side, side)) <= budget),
        None,
    )
    if tile is None:
        raise _over_budget(
            component, lo, estimate(rule(1, lo, lo)), budget,
            "build for a target with more memory",
        )
    batch = _batch_limit(rule, tile, budget, estimate, max_batch)
    return Profile(
        name=f"{component}:tile{tile}",
        min=rule(1, lo, lo),
        opt=rule(1, tile, tile),
        max=rule(batch, tile, tile),
    )


def check_engine_memory(component: str, profiles: list[Profile], activation_bytes: list[int], weights_bytes: int,
                        budget: int, estimates: list[int] | None = None) -> None:
    """Refuse an engine whose own memory figures (activations per profile, as the builder reports
    them, plus weights) exceed the budget, before it is published.

    The profiles were sized with the ONNX liveness estimate, which is not an upper bound for what
    an engine allocates (bf16 engines keep fp32 copies before each GroupNorm, for one), so the
    engine's figure has the last word.
    """
    gib = 1 << 30
    for i, (profile, activations) in enumerate(zip(profiles, activation_bytes)):
        needed = activations + weights_bytes
        if needed > budget:
            estimate = f"; the ONNX estimate was {estimates[i] / gib:.2f} GiB" if estimates and i < len(estimates) else ""
            raise ProfileError(
                f"the {component} engine's profile {profile.name} needs {needed / gib:.2f} GiB by the engine's own "
                f"figure ({activations / gib:.2f} GiB activations at batch {profile.max_batch} + "
                f"{weights_bytes / gib:.2f} GiB weights), over the memory budget of {budget / gib:.2f} GiB{estimate}. "
                "Build a smaller range (--max-px) or batch (--max-batch), or for a target with more memory"
            )
