"""FLUX.2 VAE decoder as one deployable component, and its decoder cuts (MODEL.md section 3).

``VAEDecoder`` takes the normalised 32-channel latent the upscaler produces and folds the BN
de-normalisation, ``post_quant_conv`` and the diffusers decoder into one graph. Its work is a
fixed sequence of stages, so a named cut splits it into a head and a tail that compose exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.latents import LatentStats, patchify, unpatchify

# Cut fK lies after stage K of VAEDecoder.stages: f1 after the mid-block, f2..f5 after
# decoder.up_blocks.0..3. MODEL.md names f3 (after up_blocks.1); the others follow that count.
DECODER_CUTS = {"f1": 1, "f2": 2, "f3": 3, "f4": 4, "f5": 5}


class VAEDecoder(nn.Module):
    """Normalised latent [B, 32, H, W] -> image [B, 3, 8H, 8W] in about [-1, 1].

    ``vae`` is a diffusers ``AutoencoderKLFlux2``; its decoder modules are shared, not copied.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        stats = LatentStats.from_vae(vae)
        self.register_buffer("latent_mean", stats.mean.clone())
        self.register_buffer("latent_std", stats.std.clone())
        self.post_quant_conv = vae.post_quant_conv if vae.post_quant_conv is not None else nn.Identity()
        self.decoder = vae.decoder

    @property
    def num_stages(self) -> int:
        # prologue, mid-block, each up-block, epilogue
        return len(self.decoder.up_blocks) + 3

    def run_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run stages ``start`` up to (not including) ``stop``."""
        decoder = self.decoder
        for stage in range(start, stop):
            if stage == 0:
                patches = patchify(x)
                x = unpatchify(patches * self.latent_std + self.latent_mean)
                x = decoder.conv_in(self.post_quant_conv(x))
            elif stage == 1:
                x = decoder.mid_block(x, None)
            elif stage < self.num_stages - 1:
                x = decoder.up_blocks[stage - 2](x, None)
            else:
                x = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))
        return x

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.run_stages(latents, 0, self.num_stages)


def _cut_stage(decoder: VAEDecoder, cut: str) -> int:
    stage = DECODER_CUTS.get(cut)
    if stage is None or stage >= decoder.num_stages - 1:
        valid = [name for name, s in DECODER_CUTS.items() if s < decoder.num_stages - 1]
        raise ValueError(f"unknown decoder cut {cut!r}; this decoder has cuts {', '.join(valid)}")
    return stage


class VAEDecoderHead(nn.Module):
    """Latent -> feature map at ``cut`` (everything up to and including that block)."""

    def __init__(self, decoder: VAEDecoder, cut: str):
        super().__init__()
        self.decoder = decoder
        self.cut = cut
        self.stop = _cut_stage(decoder, cut) + 1

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.run_stages(latents, 0, self.stop)


class VAEDecoderTail(nn.Module):
    """Feature map at ``cut`` -> image (the rest of the decoder; attention-free from f3 on)."""

    def __init__(self, decoder: VAEDecoder, cut: str):
        super().__init__()
        self.decoder = decoder
        self.cut = cut
        self.start = _cut_stage(decoder, cut) + 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder.run_stages(features, self.start, self.decoder.num_stages)
