"""Latent-format helpers against explicit index formulas."""

from __future__ import annotations

import pytest
import torch

from runtime.latents import (
    InvalidLatentsError,
    LatentStats,
    denormalise,
    normalise,
    pack,
    patchify,
    unpack,
    unpatchify,
)


def _patchify_by_index(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    out = torch.empty(b, 4 * c, h // 2, w // 2)
    for ch in range(c):
        for i in range(2):
            for j in range(2):
                out[:, 4 * ch + 2 * i + j] = x[:, ch, i::2, j::2]
    return out


def test_patchify_matches_index_formula():
    x = torch.randn(2, 32, 6, 10)
    assert torch.equal(patchify(x), _patchify_by_index(x))


def test_unpatchify_inverts_patchify_both_ways():
    x = torch.randn(2, 32, 8, 6)
    assert torch.equal(unpatchify(patchify(x)), x)
    p = torch.randn(1, 128, 3, 5)
    assert torch.equal(patchify(unpatchify(p)), p)


def test_normalise_matches_per_channel_formula_and_round_trips():
    mean = torch.randn(128)
    var = 0.5 + torch.rand(128)
    stats = LatentStats.from_running_stats(mean, var, eps=1e-4)
    raw = torch.randn(1, 32, 4, 6) * 3 + 1
    expected = (_patchify_by_index(raw) - mean[None, :, None, None]) / torch.sqrt(var + 1e-4)[None, :, None, None]
    normalised = normalise(raw, stats)
    torch.testing.assert_close(patchify(normalised), expected)
    torch.testing.assert_close(denormalise(normalised, stats), raw, rtol=1e-5, atol=1e-5)


def test_pack_unpack_round_trip():
    x = torch.randn(1, 32, 12, 8)
    packed = pack(x)
    assert packed.shape == (1, 128, 6, 4)
    assert torch.equal(packed, _patchify_by_index(x))
    assert torch.equal(unpack(packed), x)


@pytest.mark.parametrize(
    "call, tensor, message",
    [
        (pack, torch.randn(1, 16, 4, 4), "expects 32 channels"),
        (unpack, torch.randn(1, 32, 4, 4), "expects 128 channels"),
        (patchify, torch.randn(1, 32, 5, 4), "even height and width"),
        (patchify, torch.randn(32, 4, 4), "rank 4"),
        (unpatchify, torch.randn(1, 30, 4, 4), "divisible by 4"),
    ],
)
def test_bad_shapes_are_refused(call, tensor, message):
    with pytest.raises(InvalidLatentsError, match=message):
        call(tensor)
