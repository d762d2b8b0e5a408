"""The U-Net against the published checkpoint layout and against MODEL.md's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export.models import ConditioningEncoder, UNetBody, UpscalerUNet
from export.models.upscaler_unet import ResidualBlock, SinusoidalTimeEmbedding
from tests.conftest import SMALL_UNET


def _timestep(batch: int) -> torch.Tensor:
    return torch.full((batch,), 1000.0)


def test_state_dict_names_and_shapes_equal_published_checkpoint(full_unet, published_keys):
    state = full_unet.state_dict()
    expected = {k: list(v) for k, v in published_keys["keys"].items()}
    assert sorted(state) == sorted(expected)
    wrong = {k: (list(state[k].shape), shape) for k, shape in expected.items() if list(state[k].shape) != shape}
    assert wrong == {}


def test_parameter_count(full_unet, published_keys):
    count = sum(p.numel() for p in full_unet.parameters())
    assert count == 59_267_104 == published_keys["total_parameters"]


def test_group_norms_use_32_groups_and_eps_1e6(full_unet):
    norms = [m for m in full_unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 2 * 14  # 3 encoder + 5 down + 1 mid + 5 up blocks
    assert all(n.num_groups == 32 and n.eps == 1e-6 for n in norms)


@pytest.mark.parametrize("low_res", [(8, 12), (10, 14)])
def test_full_size_model_runs_at_tiny_sizes(full_unet, low_res):
    h, w = low_res
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 32, 2 * h, 2 * w, generator=gen)
    small = torch.randn(1, 32, h, w, generator=gen)
    with torch.no_grad():
        v = full_unet(sample=sample, timestep=_timestep(1), latents_small=small)
    assert v.shape == sample.shape
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("low_res", [(2, 2), (4, 6), (6, 10), (12, 8), (18, 14)])
def test_small_model_runs_at_several_sizes(small_unet, low_res):
    h, w = low_res
    sample = torch.randn(2, 32, 2 * h, 2 * w)
    with torch.no_grad():
        v = small_unet(sample, _timestep(2), torch.randn(2, 32, h, w))
    assert v.shape == (2, 32, 2 * h, 2 * w)
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("config", [SMALL_UNET, {}], ids=["small", "full"])
def test_components_compose_to_the_full_forward(config, full_unet, small_unet):
    model = small_unet if config else full_unet
    gen = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 32, 20, 28, generator=gen)
    small = torch.randn(2, 32, 10, 14, generator=gen)
    t = _timestep(2)
    with torch.no_grad():
        full = model(sample, t, small)
        cond, lr1, lr2, lr3 = ConditioningEncoder(model)(small, t)
        split = UNetBody(model)(sample, cond, lr1, lr2, lr3)
    assert cond.shape == (2, model.config["cond_dim"])
    assert lr1.shape[-2:] == (10, 14) and lr2.shape[-2:] == (5, 7) and lr3.shape[-2:] == (3, 4)
    assert torch.equal(full, split)


def test_components_share_the_models_parameters(small_unet):
    encoder, body = ConditioningEncoder(small_unet), UNetBody(small_unet)
    assert encoder.unet.in_conv.weight is body.unet.in_conv.weight is small_unet.in_conv.weight


def test_time_embedding_matches_formula_in_float64():
    dim, t = 512, 1000.0
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    expected = np.concatenate([np.sin(t * freqs), np.cos(t * freqs)])
    got = SinusoidalTimeEmbedding(dim)(torch.tensor([t])).double().numpy()[0]
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_time_embedding_stays_fp32_for_half_timesteps():
    emb = SinusoidalTimeEmbedding(64)
    ref = emb(torch.tensor([1000.0]))
    half = emb(torch.tensor([1000.0], dtype=torch.float16))
    assert half.dtype == torch.float32
    assert torch.equal(ref, half)


def test_residual_block_matches_model_md_formula():
    torch.manual_seed(3)
    block = ResidualBlock(64, 32, cond_dim=16).eval()
    x, cond = torch.randn(2, 64, 6, 5), torch.randn(2, 16)
    p = dict(block.named_parameters())
    h = F.conv2d(F.silu(F.group_norm(x, 32, p["norm1.weight"], p["norm1.bias"], 1e-6)),
                 p["conv1.weight"], p["conv1.bias"], padding=1)
    ss = F.linear(F.silu(cond), p["cond_proj.1.weight"], p["cond_proj.1.bias"])
    scale, shift = ss[:, :32, None, None], ss[:, 32:, None, None]
    h = F.group_norm(h, 32, p["norm2.weight"], p["norm2.bias"], 1e-6) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), p["conv2.weight"], p["conv2.bias"], padding=1)
    expected = h + F.conv2d(x, p["skip.weight"])
    with torch.no_grad():
        torch.testing.assert_close(block(x, cond), expected, rtol=1e-5, atol=1e-5)


def test_eval_mode_is_deterministic_and_train_mode_is_not():
    sample, small, t = torch.randn(1, 32, 16, 16), torch.randn(1, 32, 8, 8), _timestep(1)
    model = UpscalerUNet(**SMALL_UNET, dropout=0.5).eval()
    with torch.no_grad():
        assert torch.equal(model(sample, t, small), model(sample, t, small))
        model.train()
        assert not torch.equal(model(sample, t, small), model(sample, t, small))


def test_up_stage_upsamples_by_scale_factor_2_as_model_md_says():
    from export.models.upscaler_unet import UpStage

    torch.manual_seed(4)
    stage = UpStage(32, cond_dim=16, num_blocks=1).eval()
    x, skip, cond = torch.randn(1, 32, 3, 5), torch.randn(1, 32, 6, 10), torch.randn(1, 16)
    up = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = stage.blocks[0](torch.cat([up, skip], dim=1), cond)
        assert torch.equal(stage(x, skip, cond), expected)
