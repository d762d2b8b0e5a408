"""The runtime on a CUDA device (torch backend; the ONNX Runtime CUDA provider where installed)."""

from __future__ import annotations

import pytest
import torch

from engines.targets import PRESETS
from export.build import BuildSettings, build_artifacts
from export.checkpoint import load_unet
from export.onnx.components import Models
from export.reference import upscale as reference_upscale
from runtime import InvalidLatentsError, Upscaler

from .conftest import SMALL_UNET

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_artifacts")
    unet = load_unet(random_weights=True, seed=0, **SMALL_UNET)
    settings = BuildSettings(
        target=PRESETS["h100"].with_range(64, 512), precision="fp16", vae_precision="fp32",
        components=("cond_encoder", "unet"), weights={"unet": {"source": "random", "seed": 0}},
    )
    build_artifacts(Models(unet=unet), settings, out, log=lambda line: None)
    return out, unet


def test_torch_backend_on_cuda_keeps_tensors_on_the_device(artifacts):
    folder, unet = artifacts
    x = torch.randn(2, 32, 8, 12, generator=torch.Generator().manual_seed(1))
    expected = reference_upscale(unet, x, 4, seed=5)
    with Upscaler.load(folder, backend="torch", device="cuda") as upscaler:
        got = upscaler.upscale(x.cuda(), scale=4, seed=5)
        assert got.device.type == "cuda" and upscaler.memory_bytes() > 0
        with pytest.raises(InvalidLatentsError, match="are on cpu but this upscaler runs on cuda:0"):
            upscaler.upscale(x)
        with pytest.raises(InvalidLatentsError, match="numpy input is accepted on the CPU only"):
            upscaler.upscale(x.numpy())
    # cuDNN may use TF32 for fp32 convolutions: compare with a tolerance, not bit for bit.
    assert float((got.cpu() - expected).norm() / expected.norm()) < 1e-2


def test_auto_on_cuda_says_why_it_skipped_faster_backends(artifacts):
    with Upscaler.load(artifacts[0], device="cuda") as upscaler:
        assert upscaler.backend_name in {"tensorrt", "onnxruntime-cuda", "torch"}
        if upscaler.backend_name != "tensorrt":
            assert "tensorrt" in upscaler.skipped_backends


def test_a_backends_own_stream_is_ordered_after_and_before_the_callers_work():
    from runtime.backends import OwnStream

    device = torch.device("cuda", torch.cuda.current_device())
    own, caller = OwnStream(device), torch.cuda.Stream(device)
    with torch.cuda.stream(caller):
        x = torch.ones(1 << 20, device=device)
        torch.cuda._sleep(50_000_000)  # keep the caller's stream busy, so a missing wait would show
        x.add_(1)
        with own.scope() as seen:
            assert seen == caller and torch.cuda.current_stream(device) == own.stream
            y = x * 2
        z = y + 1  # back on the caller's stream, after the backend's work
    torch.cuda.synchronize(device)
    assert bool((z == 5).all())
