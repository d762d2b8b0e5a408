"""Tiny, randomly initialised, real diffusers FLUX.2 pipelines for CPU tests.

CI runs diffusers' own ``Flux2Pipeline`` and ``Flux2KleinPipeline`` code (latent preparation, packing,
the denoising loop, BN (de)normalisation, decoding, post-processing) with tiny random components, so
the tests see exactly what the pipelines hand over. There is no text encoder or tokenizer (no files
to download): the tests pass random ``prompt_embeds``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)

from export.checkpoint import seeded_init

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# Each prompt embedding is, in the real pipelines, 3 stacked text-encoder layers of the hidden width.
PROMPT_EMBED_DIM = 3 * 8
PROMPT_TOKENS = 8
HEAD_DIM = 16
# RoPE over the 4 position axes (t, h, w, l) must cover the whole attention head.
ROPE_AXES = (4, 4, 4, 4)

# FLUX.2's released scheduler config: the pipelines pass ``mu`` (from the token count and steps).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
)

KINDS = ("flux2", "klein")


def tiny_pipeline(kind: str, vae: AutoencoderKLFlux2) -> Flux2Pipeline | Flux2KleinPipeline:
    """``kind`` "flux2" (guidance-embedding transformer) or "klein" (step-distilled, no guidance
    embedding, as the released FLUX.2 [klein] models); the transformer's input follows ``vae``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    packed_channels = 4 * vae.config.latent_channels  # 2x2 patches of the VAE latent: 128 for FLUX.2's 32
    transformer = seeded_init(lambda: Flux2Transformer2DModel(
        in_channels=packed_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=HEAD_DIM, num_attention_heads=2, joint_attention_dim=PROMPT_EMBED_DIM,
        timestep_guidance_channels=32, axes_dims_rope=ROPE_AXES, guidance_embeds=kind == "flux2",
    ), seed=0).eval()
    components = dict(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        text_encoder=None, tokenizer=None,
    )
    if kind == "flux2":
        pipe = Flux2Pipeline(**components)
    else:
        pipe = Flux2KleinPipeline(**components, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(pipe: Flux2Pipeline | Flux2KleinPipeline, batch: int = 1) -> torch.Tensor:
    """Seeded random [batch, tokens, joint_attention_dim] embeddings, as ``encode_prompt`` returns."""
    dim = pipe.transformer.config.joint_attention_dim
    return torch.randn(batch, PROMPT_TOKENS, dim, generator=torch.Generator().manual_seed(0))


def run(
    pipe: Flux2Pipeline | Flux2KleinPipeline,
    output_type: str,
    seed: int,
    height: int = 64,
    width: int = 64,
    steps: int = 2,
    batch: int = 1,
    guidance_scale: float = 1.0,
    **kw,
) -> torch.Tensor | np.ndarray | list[Image.Image]:
    """The pipeline's ``.images``. ``guidance_scale`` 1.0 keeps Klein from warning that a distilled
    model ignores guidance (Klein never runs CFG here, so no negative prompt is encoded)."""
    return pipe(
        prompt_embeds=prompt_embeds(pipe, batch), num_inference_steps=steps, height=height, width=width,
        guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed), output_type=output_type,
        **kw,
    ).images
