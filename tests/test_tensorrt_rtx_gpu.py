"""TensorRT-RTX engines on the GPU they were built for: load, run against the fp32 eager model,
reuse the runtime cache, pass the check set. Needs tensorrt-rtx and a GPU whose compute
capability TensorRT-RTX targets (7.5, 8.0, 8.6, 8.9, 12.0, 12.1). Not yet run on such a GPU.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engines.flavours import TENSORRT_RTX
from engines.targets import detect_target
from export.pipeline.driver import build_artifacts
from export.pipeline.settings import BuildSettings
from export.reference import upscale as reference_upscale
from runtime import Upscaler
from runtime.numerics import full_fp32


def _rtx_gpu() -> str | None:
    """Why these tests cannot run here (None when they can)."""
    if TENSORRT_RTX.version() is None:
        return "tensorrt-rtx is not installed (pip install -e '.[rtx]')"
    if not torch.cuda.is_available():
        return "no CUDA GPU: TensorRT-RTX engines need one to load"
    capability = torch.cuda.get_device_capability(0)
    if not TENSORRT_RTX.targets(capability):
        return "this GPU's compute capability %d.%d is not one TensorRT-RTX targets" % capability
    return None


pytestmark = pytest.mark.skipif(_rtx_gpu() is not None, reason=_rtx_gpu() or "")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, small_models):
    out = tmp_path_factory.mktemp("rtx_gpu")
    target = detect_target().with_range(64, 256)
    settings = BuildSettings(target=target, precision="fp16", vae_precision=target.vae_precision,
                             engine_flavour="tensorrt-rtx")
    build_artifacts(small_models, settings, out, log=lambda line: None)
    return out


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOW_UPSCALER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_engines_load_pass_their_check_and_match_the_fp32_model(folder, small_models, cache):
    latents = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(3))
    with Upscaler.load(folder, backend="tensorrt", noise="cpu") as up:
        assert up.backend_name == "tensorrt" and up.backend.flavour is TENSORRT_RTX
        got = up.upscale(latents.cuda(), seed=7).float().cpu()
        again = up.upscale(latents.cuda(), seed=7).float().cpu()  # the CUDA graph replay
    with full_fp32():
        ref = reference_upscale(small_models.unet, latents, seed=7)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 5e-3, f"rel-L2 {rel} against the fp32 eager model"
    assert torch.equal(got, again)
    assert list(cache.rglob("*.cache")), "no runtime cache was written"
    assert list(cache.rglob("*verdict*")) or list(cache.rglob("*.json")), "no check verdict was cached"


def test_a_second_load_reuses_the_runtime_cache_and_the_verdict(folder, cache, caplog):
    latents = torch.randn(1, 32, 16, 16).cuda()
    with Upscaler.load(folder, backend="tensorrt") as up:
        up.upscale(latents, seed=1)
    caches = {p: p.stat().st_mtime_ns for p in cache.rglob("*.cache")}
    caplog.set_level("INFO")
    with Upscaler.load(folder, backend="tensorrt") as up:
        up.upscale(latents, seed=1)
    assert any("runtime cache loaded" in r.getMessage() for r in caplog.records)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.cache")} == caches  # nothing new compiled


def test_runtime_check_passes_on_the_gpu(folder, cache):
    done = subprocess.run([sys.executable, "-m", "runtime.check", str(folder), "--backend", "tensorrt",
                           "--device", "cuda"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
