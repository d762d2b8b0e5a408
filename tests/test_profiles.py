"""Profile derivation from a resolution range and a memory budget (pure Python)."""

from __future__ import annotations

import pytest

from engines.profiles import Profile, ProfileError, octave_sides, pass_profiles, select_profile, tile_profile


def rule(batch: int, h: int, w: int) -> dict:
    # Shaped like the U-Net body: a main input and a half-size side input.
    return {"sample": (batch, 32, h, w), "side": (batch, 8, h // 2, w // 2), "cond": (batch, 16)}


def area_estimate(bytes_per_pixel: int):
    return lambda shapes: shapes["sample"][0] * shapes["sample"][2] * shapes["sample"][3] * bytes_per_pixel


def test_octaves_cover_the_range_on_the_grid():
    assert octave_sides(128, 1024, 4) == [128, 256, 512, 1024]
    assert octave_sides(96, 1000, 4) == [96, 192, 384, 1000]
    assert octave_sides(124, 1024, 4) == [124, 248, 496, 1024]
    assert octave_sides(128, 2048 - 4, 4) == [128, 256, 512, 1024, 2044]
    assert octave_sides(64, 64, 2) == [64]
    for lo, hi, grid in ((130, 1024, 4), (128, 1022, 4), (0, 64, 2)):
        with pytest.raises(ProfileError, match="multiples of"):
            octave_sides(lo, hi, grid)
    with pytest.raises(ProfileError, match="below the smallest"):
        octave_sides(256, 128, 4)


def test_pass_profiles_split_per_octave_and_stay_consistent():
    profiles = pass_profiles(rule, 128, 1024, 4, budget=10**12, estimate=area_estimate(1), max_batch=4)
    assert [p.opt["sample"][2:] for p in profiles] == [(128, 128), (256, 256), (512, 512), (1024, 1024)]
    for p in profiles:
        assert p.min == rule(1, 128, 128)
        assert p.opt["sample"][0] == 1 and p.max_batch == 4
        for name in p.min:
            assert all(a <= b <= c for a, b, c in zip(p.min[name], p.opt[name], p.max[name]))
        assert all(s % 4 == 0 for s in p.max["sample"][2:])
        # every input's shapes come from the same rule, so side inputs track the main one
        assert p.max["side"][2:] == tuple(s // 2 for s in p.max["sample"][2:])


def test_memory_budget_limits_batch_per_profile():
    budget = 3 * 512 * 512  # bytes; one byte per latent pixel
    profiles = pass_profiles(rule, 128, 512, 4, budget=budget, estimate=area_estimate(1), max_batch=4)
    assert [p.max_batch for p in profiles] == [4, 4, 3]


def test_range_over_budget_at_batch_1_is_an_error_naming_the_fix():
    with pytest.raises(ProfileError, match=r"component at batch 1 and 1024x1024 latent pixels needs about 1\.0 GiB, over the memory budget of 0\.5 GiB; lower"):
        pass_profiles(rule, 128, 1024, 4, budget=2**29, estimate=area_estimate(1024), max_batch=2)


def test_tile_profile_takes_the_largest_tile_that_fits():
    budget = 100 * 100 * 1024
    profile = tile_profile(rule, 32, 4, budget=budget, estimate=area_estimate(1024), cap=128, max_batch=1)
    assert profile.opt["sample"][2:] == (100, 100) == profile.max["sample"][2:]
    assert profile.min["sample"][2:] == (32, 32)
    capped = tile_profile(rule, 32, 4, budget=10**12, estimate=area_estimate(1), cap=128)
    assert capped.max["sample"][2:] == (128, 128)
    with pytest.raises(ProfileError, match="over the memory budget"):
        tile_profile(rule, 32, 4, budget=10, estimate=area_estimate(1), cap=128)


def test_selection_prefers_the_smallest_covering_profile_and_any_aspect_ratio():
    profiles = pass_profiles(rule, 128, 1024, 4, budget=10**12, estimate=area_estimate(1), max_batch=2)
    assert select_profile(profiles, rule(1, 128, 128)) == 0
    assert select_profile(profiles, rule(1, 128, 192)) == 1
    assert select_profile(profiles, rule(2, 128, 1024)) == 3
    assert select_profile(profiles, rule(1, 124, 128)) is None  # below the range
    assert select_profile(profiles, rule(3, 128, 128)) is None  # batch over the limit
    assert select_profile(profiles, {"sample": (1, 32, 128, 128)}) is None  # inputs missing


def test_profile_round_trips_through_json():
    profile = pass_profiles(rule, 128, 256, 4, budget=10**12, estimate=area_estimate(1))[1]
    assert Profile.from_dict(profile.to_dict()) == profile
