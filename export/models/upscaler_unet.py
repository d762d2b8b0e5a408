"""The Flow Upscaler U-Net (MODEL.md section 1).

Parameter names match the published ``flow_upscaler.safetensors`` exactly, so the default
configuration loads it with ``strict=True``. Besides the full forward, the model exposes its two
deployment components, ``encode_conditioning`` and ``denoise``; their composition is the forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor below that for small test widths."""
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


class SinusoidalTimeEmbedding(nn.Module):
    """Parameter-free sin/cos embedding, always computed in fp32.

    At t = 1000 an fp16 argument is off by up to 0.25 rad, so reduced-precision graphs must keep
    this part in fp32 (MODEL.md section 2).
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.max_period = max_period

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        exponent = torch.arange(half, device=timestep.device, dtype=torch.float32) / half
        freqs = torch.exp(-math.log(self.max_period) * exponent)
        args = timestep.float()[:, None] * freqs[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class TimeConditioning(nn.Module):
    """Timestep -> conditioning vector ``cond`` shared by every residual block."""

    def __init__(self, time_dim: int, cond_dim: int):
        super().__init__()
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        self.time_proj = nn.Sequential(
            nn.Linear(time_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        embedding = self.time_embed(timestep).to(self.time_proj[0].weight.dtype)
        return self.time_proj(embedding)


class BilinearResize(nn.Module):
    """Parameter-free bilinear resize (align_corners False).

    ``compute_dtype`` lets an export run the resize in another type than its neighbours:
    TensorRT's operator reference lists no bf16 Resize, so bf16 graphs resize in fp32.
    """

    def __init__(self):
        super().__init__()
        self.compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = x if self.compute_dtype is None else x.to(self.compute_dtype)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False).to(x.dtype)


class ResidualBlock(nn.Module):
    """GroupNorm/SiLU/conv block with a scale-shift from ``cond`` between its two convs."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * out_channels))
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond_proj(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class DownStage(nn.Module):
    """Residual blocks plus a stride-2 conv; returns ``(x, skip)`` with skip = the blocks' output."""

    def __init__(
        self,
        channels: int,
        cond_dim: int,
        num_blocks: int,
        dropout: float = 0.0,
        downsample_first: bool = False,
    ):
        super().__init__()
        self.downsample_first = downsample_first
        self.blocks = nn.ModuleList(
            ResidualBlock(channels, channels, cond_dim, dropout) for _ in range(num_blocks)
        )
        self.downsample = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.downsample_first:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x, cond)
        skip = x
        if not self.downsample_first:
            x = self.downsample(x)
        return x, skip


class UpStage(nn.Module):
    """Bilinear x2 upsample (no conv), concatenation with the skip, then residual blocks."""

    def __init__(self, channels: int, cond_dim: int, num_blocks: int, dropout: float = 0.0):
        super().__init__()
        self.resize = BilinearResize()
        self.blocks = nn.ModuleList(
            ResidualBlock(2 * channels if i == 0 else channels, channels, cond_dim, dropout)
            for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # An exact x2 resize by size equals scale_factor=2 (both sample at 0.5-step offsets).
        x = self.resize(x, (2 * x.shape[-2], 2 * x.shape[-1]))
        if x.shape[-2:] != skip.shape[-2:]:
            x = self.resize(x, skip.shape[-2:])
        x = torch.cat([x, skip], dim=1)
        for block in self.blocks:
            x = block(x, cond)
        return x


class LowResEncoder(nn.Module):
    """Encodes the low-resolution latent into feature maps at h, h/2 and h/4."""

    def __init__(self, sample_channels: int, channels: int, cond_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_conv = nn.Conv2d(sample_channels, channels, 1)
        self.block_1 = ResidualBlock(channels, channels, cond_dim, dropout)
        self.block_2 = DownStage(channels, cond_dim, 1, dropout, downsample_first=True)
        self.block_3 = DownStage(channels, cond_dim, 1, dropout, downsample_first=True)

    def forward(
        self, latents_small: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lr1 = self.block_1(self.in_conv(latents_small), cond)
        lr2, _ = self.block_2(lr1, cond)
        lr3, _ = self.block_3(lr2, cond)
        return lr1, lr2, lr3


class FiLM(nn.Module):
    """Spatial scale-shift of ``x`` by maps projected from a low-res feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, 2 * channels, 1))

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        scale, shift = self.cond_proj(features).chunk(2, dim=1)
        return x * (1 + scale) + shift


class UpscalerUNet(nn.Module):
    """Predicts the rectified-flow velocity that takes noise to the 2x latent.

    ``sample`` is [B, C, H, W] with H and W multiples of 4; ``latents_small`` is [B, C, H/2, W/2].
    Dropout exists only so training checkpoints load; call ``eval()`` for inference.
    """

    def __init__(
        self,
        sample_channels: int = 32,
        base_channels: int = 384,
        time_dim: int = 512,
        cond_dim: int = 1024,
        dropout: float = 0.01,
    ):
        super().__init__()
        self.config = dict(
            sample_channels=sample_channels,
            base_channels=base_channels,
            time_dim=time_dim,
            cond_dim=cond_dim,
            dropout=dropout,
        )
        c = base_channels
        self.conditioning = TimeConditioning(time_dim, cond_dim)
        self.in_conv = nn.Conv2d(sample_channels, c, 1)
        self.low_res_encoder = LowResEncoder(sample_channels, c, cond_dim)
        self.resize = BilinearResize()
        self.film_cond_1 = FiLM(c)
        self.film_cond_2 = FiLM(c)
        self.film_cond_3 = FiLM(c)
        self.down_stages = nn.ModuleList(
            [DownStage(c, cond_dim, 3, dropout), DownStage(c, cond_dim, 2, dropout)]
        )
        self.mid_stages = nn.ModuleList([ResidualBlock(c, c, cond_dim, dropout)])
        self.up_stages = nn.ModuleList(
            [UpStage(c, cond_dim, 2, dropout), UpStage(c, cond_dim, 3, dropout)]
        )
        self.out_conv = nn.Conv2d(c, sample_channels, 1)

    def encode_conditioning(
        self, latents_small: torch.Tensor, timestep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``cond_encoder`` component: ``(cond, lr1, lr2, lr3)`` at the low-res grid."""
        cond = self.conditioning(timestep)
        lr1, lr2, lr3 = self.low_res_encoder(latents_small, cond)
        return cond, lr1, lr2, lr3

    def denoise(
        self,
        sample: torch.Tensor,
        cond: torch.Tensor,
        lr1: torch.Tensor,
        lr2: torch.Tensor,
        lr3: torch.Tensor,
    ) -> torch.Tensor:
        """The ``unet`` component: velocity from the sample and the encoded conditioning."""
        height, width = sample.shape[-2:]
        lr1 = self.resize(lr1, (height, width))
        lr2 = self.resize(lr2, (height // 2, width // 2))
        lr3 = self.resize(lr3, (height // 4, width // 4))

        x = self.film_cond_1(self.in_conv(sample), lr1)
        x, skip_0 = self.down_stages[0](x, cond)
        x = self.film_cond_2(x, lr2)
        x, skip_1 = self.down_stages[1](x, cond)
        x = self.film_cond_3(x, lr3)
        for block in self.mid_stages:
            x = block(x, cond)
        x = self.up_stages[0](x, skip_1, cond)
        x = self.up_stages[1](x, skip_0, cond)
        return self.out_conv(x)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, latents_small: torch.Tensor
    ) -> torch.Tensor:
        return self.denoise(sample, *self.encode_conditioning(latents_small, timestep))
