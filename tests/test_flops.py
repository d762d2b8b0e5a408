"""FLOP counts against an independent count from the layers' shapes."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.flops import FlopCounter
from export.models import ConditioningEncoder, UNetBody


def _layer_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """2 x multiply-adds of every Conv2d and Linear, from their weights and output sizes."""
    total = 0

    def hook(layer, args, output):
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            total += 2 * output.numel() * (layer.in_channels // layer.groups) * kh * kw
        else:
            total += 2 * output.numel() * layer.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module(*inputs)
    for handle in handles:
        handle.remove()
    return total


def test_unet_pass_flops_match_the_layer_count(small_unet):
    encoder, body = ConditioningEncoder(small_unet), UNetBody(small_unet)
    x, t = torch.randn(1, 32, 12, 16), torch.full((1,), 1000.0)
    encoded = encoder(x, t)
    sample = torch.randn(1, 32, 24, 32)
    counted = FlopCounter(encoder).count([(tuple(x.shape), torch.float32), ((1,), torch.float32)])
    assert counted == _layer_flops(encoder, (x, t)) > 0
    body_inputs = (sample, *encoded)
    counted = FlopCounter(body).count([(tuple(v.shape), v.dtype) for v in body_inputs])
    assert counted == _layer_flops(body, body_inputs) > 0


def test_full_unet_pass_at_128_output_latent_is_the_published_740_gflop(full_unet):
    body = UNetBody(full_unet)
    shapes = [(1, 32, 128, 128), (1, 1024), (1, 384, 64, 64), (1, 384, 32, 32), (1, 384, 16, 16)]
    encoder = ConditioningEncoder(full_unet)
    total = FlopCounter(body).count([(s, torch.float32) for s in shapes])
    total += FlopCounter(encoder).count([((1, 32, 64, 64), torch.float32), ((1,), torch.float32)])
    assert round(total / 1e9) == 740  # MODEL.md section 4


def test_count_does_not_depend_on_the_module_dtype(small_unet):
    encoder = ConditioningEncoder(small_unet)
    inputs = [((1, 32, 8, 8), torch.float32), ((1,), torch.float32)]
    fp32 = FlopCounter(encoder).count(inputs)
    assert FlopCounter(ConditioningEncoder(small_unet.half())).count(inputs) == fp32
