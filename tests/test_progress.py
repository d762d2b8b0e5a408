"""The runtime's progress/cancel hook (``runtime.progress``): steps, cancel between them, nothing left half-done."""

from __future__ import annotations

import pytest
import torch

from runtime import InvalidArgumentError, Upscaler


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module")
def upscaler(small_artifacts):
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as loaded:
        yield loaded


def _latents(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def test_progress_counts_each_pass_and_each_decoded_tile(upscaler):
    calls = []
    x = _latents(1, 32, 8, 8)
    upscaler.upscale(x, scale=4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 2), (1, 2), (2, 2)]

    calls.clear()
    large = _latents(1, 32, 96, 80)  # the decoder profile's tile is 64: 2 x 2 tiles
    assert upscaler.decode_tiles(96, 80) == 4
    upscaler.decode(large, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]

    calls.clear()
    upscaler.upscale(x, scale=2, decode=True, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 2), (1, 2), (2, 2)]  # one pass, then the 16x16 decode in one tile


def test_raising_from_progress_cancels_between_passes_and_leaves_the_upscaler_whole(upscaler):
    x = _latents(2, 32, 8, 8)
    expected = upscaler.upscale(x, scale=8, seed=[5, 6])
    seen = []

    def cancel_after_first_pass(done, total):
        seen.append(done)
        if done == 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        upscaler.upscale(x, scale=8, seed=[5, 6], progress=cancel_after_first_pass)
    assert seen == [0, 1]  # the second and third passes never ran
    assert torch.equal(upscaler.upscale(x, scale=8, seed=[5, 6]), expected)

    with pytest.raises(Cancelled):
        upscaler.decode(_latents(1, 32, 96, 80), progress=lambda done, total: (_ for _ in ()).throw(Cancelled()))
    assert torch.equal(upscaler.upscale(x, scale=8, seed=[5, 6]), expected)


def test_progress_must_be_callable(upscaler):
    with pytest.raises(InvalidArgumentError, match="progress must be a callable"):
        upscaler.upscale(_latents(1, 32, 8, 8), progress=3)
    with pytest.raises(InvalidArgumentError, match="progress must be a callable"):
        upscaler.decode(_latents(1, 32, 8, 8), progress="yes")
