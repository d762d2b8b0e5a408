"""The VAE decoder component against diffusers' own decode (small VAE configuration)."""

from __future__ import annotations

import pytest
import torch

from export.models import DECODER_CUTS, VAEDecoder, VAEDecoderHead, VAEDecoderTail


def _denormalise_by_hand(latents: torch.Tensor, vae) -> torch.Tensor:
    """Inverse BN per patchified channel 4c + 2i + j, written with strided indexing."""
    mean, var, eps = vae.bn.running_mean, vae.bn.running_var, vae.config.batch_norm_eps
    out = torch.empty_like(latents)
    for c in range(latents.shape[1]):
        for i in range(2):
            for j in range(2):
                k = 4 * c + 2 * i + j
                out[:, c, i::2, j::2] = latents[:, c, i::2, j::2] * torch.sqrt(var[k] + eps) + mean[k]
    return out


def test_decoder_component_equals_diffusers_decode(small_vae):
    latents = torch.randn(2, 32, 6, 10)
    with torch.no_grad():
        ours = VAEDecoder(small_vae)(latents)
        theirs = small_vae.decode(_denormalise_by_hand(latents, small_vae)).sample
    assert ours.shape == (2, 3, 48, 80)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bn_statistics_are_not_trivial(small_vae):
    # Otherwise the comparison above would not exercise the de-normalisation.
    assert small_vae.bn.running_mean.abs().max() > 0.1
    assert (small_vae.bn.running_var - 1).abs().max() > 0.1


@pytest.mark.parametrize("cut", sorted(DECODER_CUTS))
def test_head_and_tail_compose_to_the_decoder(small_vae, cut):
    decoder = VAEDecoder(small_vae)
    latents = torch.randn(1, 32, 4, 6)
    with torch.no_grad():
        features = VAEDecoderHead(decoder, cut)(latents)
        image = VAEDecoderTail(decoder, cut)(features)
        assert torch.equal(image, decoder(latents))


def test_f3_cut_sits_after_up_blocks_1(small_vae):
    decoder = VAEDecoder(small_vae)
    seen = {}
    small_vae.decoder.up_blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("f3", o))
    latents = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        features = VAEDecoderHead(decoder, "f3")(latents)
    assert torch.equal(features, seen["f3"])
    # two of the three upsamplers have run: 4 -> 16
    assert features.shape[-2:] == (16, 16)


def test_unknown_cut_names_the_valid_ones(small_vae):
    with pytest.raises(ValueError, match="f1, f2, f3, f4, f5"):
        VAEDecoderTail(VAEDecoder(small_vae), "f9")
