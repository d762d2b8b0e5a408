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
    with Upscaler.load(folder, backend="torch", device="cuda", noise="cpu") as upscaler:
        got = upscaler.upscale(x.cuda(), scale=4, seed=5)
        assert got.device.type == "cuda" and upscaler.memory_bytes() > 0
        with pytest.raises(InvalidLatentsError, match="are on cpu but this upscaler runs on cuda:0"):
            upscaler.upscale(x)
        with pytest.raises(InvalidLatentsError, match="numpy input is accepted on the CPU only"):
            upscaler.upscale(x.numpy())
    # IEEE fp32 on both sides (TF32 off): only summation order differs between CPU and GPU
    assert float((got.cpu() - expected).norm() / expected.norm()) < 1e-4


def test_auto_on_cuda_says_why_it_skipped_faster_backends(artifacts):
    with Upscaler.load(artifacts[0], device="cuda") as upscaler:
        # the folder is fp16: auto runs torch in fp16 when it gets that far
        assert upscaler.backend_name in {"tensorrt", "onnxruntime-cuda", "torch-fp16"}
        assert upscaler.noise_mode == "device"
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


def _rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm())


def test_device_noise_is_reproducible_and_a_seed_list_equals_items_alone(artifacts):
    folder, _ = artifacts
    x = torch.randn(3, 32, 8, 12, generator=torch.Generator().manual_seed(2)).cuda()
    with Upscaler.load(folder, backend="torch", device="cuda", precision="fp32", noise="device") as upscaler:
        first = upscaler.upscale(x, scale=4, seed=[4, 5, 6])
        assert torch.equal(first, upscaler.upscale(x, scale=4, seed=[4, 5, 6]))
        for i, seed in enumerate([4, 5, 6]):
            alone = upscaler.upscale(x[i : i + 1], scale=4, seed=seed)
            assert _rel_l2(first[i : i + 1], alone) < 1e-5


def test_cpu_noise_drawn_ahead_on_a_gpu_is_the_convention(artifacts):
    folder, unet = artifacts
    x = torch.randn(2, 32, 8, 12, generator=torch.Generator().manual_seed(3))
    with Upscaler.load(folder, backend="torch", device="cuda", noise="cpu") as upscaler:
        got = upscaler.upscale(x.cuda(), scale=8, seed=7)
    expected = reference_upscale(unet, x, 8, seed=7)
    assert _rel_l2(got, expected) < 1e-4


@pytest.mark.parametrize("precision, compile_mode", [("fp16", None), ("bf16", None), ("fp16", "max-autotune-no-cudagraphs"),
                                                     ("fp16", "reduce-overhead")])
def test_torch_production_modes_stay_inside_the_gates_limits(artifacts, precision, compile_mode):
    from calib.accuracy import THRESHOLDS

    folder, unet = artifacts
    x = torch.randn(1, 32, 16, 24, generator=torch.Generator().manual_seed(4))
    expected = reference_upscale(unet, x, 4, seed=3)
    with Upscaler.load(folder, backend="torch", device="cuda", noise="cpu", precision=precision,
                       compile_mode=compile_mode) as upscaler:
        first = upscaler.upscale(x.cuda(), scale=4, seed=3)
        second = upscaler.upscale(x.cuda(), scale=4, seed=3)  # a replay where CUDA graphs are on
        other = upscaler.upscale(x.cuda() * 0.5, scale=4, seed=3)
    assert torch.equal(first, second) and not torch.equal(first, other)  # outputs own their memory
    assert _rel_l2(first, expected) < THRESHOLDS[precision].rel_l2


def test_onnxruntime_cuda_runs_on_its_own_stream_ordered_with_the_callers(artifacts):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    folder, unet = artifacts
    x = torch.randn(1, 32, 16, 24, generator=torch.Generator().manual_seed(5))
    expected = reference_upscale(unet, x, 2, seed=1)
    caller = torch.cuda.Stream()
    with Upscaler.load(folder, backend="onnxruntime", device="cuda", noise="cpu") as upscaler, torch.cuda.stream(caller):
        assert upscaler.backend_name == "onnxruntime-cuda"
        latents = torch.zeros_like(x, device="cuda")
        torch.cuda._sleep(50_000_000)  # the input is written late on the caller's stream
        latents.add_(x.cuda())
        got = upscaler.upscale(latents, seed=1)
        result = got * 1  # the caller's next work on the output
    torch.cuda.synchronize()
    assert _rel_l2(result, expected) < 1e-2  # the fp16 graphs' tolerance
