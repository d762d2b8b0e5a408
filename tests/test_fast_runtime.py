"""The fast runtime's CPU-checkable parts: the noise convention and its sources, per-item seeds,
IEEE fp32 where the code says fp32, and the torch backend's fp16/bf16/compiled modes against the
fp32 eager reference (GPU checks: tests/test_runtime_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from calib.accuracy import THRESHOLDS
from export.reference import upscale as reference_upscale
from export.reference import velocity
from runtime import Upscaler
from runtime.noise import CpuNoise, DeviceNoise
from runtime.numerics import full_fp32
from runtime import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[1]


def _latents(*shape, seed=1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def _fp32_switches() -> dict[str, str]:
    b = torch.backends
    return {"matmul": b.cuda.matmul.fp32_precision, "conv": b.cudnn.conv.fp32_precision,
            "mkldnn_conv": b.mkldnn.conv.fp32_precision}


@pytest.fixture(scope="module")
def pass_folder(small_artifacts, small_models):
    """The run's small folder (fp16 graphs, random weights): what the torch backend rebuilds and checks."""
    return small_artifacts, small_models.unet


# -- the noise convention ---------------------------------------------------------------------


def test_cpu_noise_is_torch_randn_on_one_cpu_generator_pass_after_pass():
    noise = CpuNoise(1234)
    generator = torch.Generator("cpu").manual_seed(1234)
    for shape in [(2, 32, 4, 6), (2, 32, 8, 12), (2, 32, 16, 24)]:
        expected = torch.randn((shape[0], 32, 2 * shape[2], 2 * shape[3]), generator=generator)
        assert torch.equal(noise.next_pass(torch.zeros(shape)), expected)


def test_a_seed_list_gives_each_item_the_noise_it_gets_alone():
    seeds = [7, 2**64 - 1, 0]
    together = CpuNoise(seeds)
    alone = [CpuNoise(s) for s in seeds]
    for shape in [(3, 32, 4, 6), (3, 32, 8, 12)]:
        batch = together.next_pass(torch.zeros(shape))
        for i, source in enumerate(alone):
            assert torch.equal(batch[i : i + 1], source.next_pass(torch.zeros(1, *shape[1:])))
    # on the CPU, the device source is the same generator type: the same numbers
    assert torch.equal(DeviceNoise(seeds, "cpu").next_pass(torch.zeros(3, 32, 4, 6)),
                       CpuNoise(seeds).next_pass(torch.zeros(3, 32, 4, 6)))


# -- per-item seeds through the Upscaler ------------------------------------------------------


def test_a_batch_with_a_seed_list_equals_its_items_run_alone(small_artifacts):
    x = _latents(3, 32, 8, 12, seed=4)
    seeds = [11, 12, 13]
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        together = upscaler.upscale(x, scale=4, seed=seeds)
        for i, seed in enumerate(seeds):
            alone = upscaler.upscale(x[i : i + 1], scale=4, seed=seed)
            # ONNX Runtime may order a batch's sums differently: equal up to rounding
            assert torch.allclose(together[i : i + 1], alone, rtol=0, atol=1e-4), i
            assert _rel_l2(together[i : i + 1], alone) < 1e-5
        assert torch.equal(upscaler.upscale(x[:1], seed=[5]), upscaler.upscale(x[:1], seed=5))
        # distinct seeds give distinct items; one int seed is the batch convention, not a list
        assert not torch.allclose(together[0], together[1])
        assert not torch.allclose(upscaler.upscale(x, seed=11)[1:2], upscaler.upscale(x[1:2], seed=11))


@pytest.mark.parametrize(
    "seed, message",
    [
        ([1, 2], "one seed per batch item: 3 for this batch, got 2"),
        ([1, 2, -1], r"seed\[2\] must be an integer in 0\.\."),
        ([1, 2, 1.5], r"seed\[2\] must be an integer in 0\.\..*float"),
        ([1, True, 3], r"seed\[1\] must be an integer"),
        (torch.tensor([[1, 2, 3]]), "one seed per batch item"),
    ],
)
def test_bad_seed_lists_are_refused_by_name(small_artifacts, seed, message):
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        with pytest.raises(InvalidArgumentError, match=message):
            upscaler.upscale(_latents(3, 32, 8, 8), seed=seed)


def test_noise_mode_is_checked_and_cpu_is_the_default_on_the_cpu(small_artifacts):
    with pytest.raises(InvalidArgumentError, match="noise must be one of auto, cpu, device, got 'gpu'"):
        Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu", noise="gpu")
    with Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu") as upscaler:
        assert upscaler.noise_mode == "cpu"


def test_torch_options_are_refused_for_backends_that_run_built_graphs(small_artifacts):
    with pytest.raises(InvalidArgumentError, match="configure the torch backend; the onnxruntime backend"):
        Upscaler.load(small_artifacts, backend="onnxruntime", device="cpu", precision="fp16")
    with pytest.raises(InvalidArgumentError, match="precision must be one of fp32, fp16, bf16, int8, got 'int4'"):
        Upscaler.load(small_artifacts, backend="torch", device="cpu", precision="int4")
    with pytest.raises(InvalidArgumentError, match="precision int8 runs the folder's CPU graphs on ONNX Runtime: with "
                       "backend auto or onnxruntime"):
        Upscaler.load(small_artifacts, backend="torch", device="cpu", precision="int8")
    with pytest.raises(InvalidArgumentError, match="compile_mode must be one of default, reduce-overhead"):
        Upscaler.load(small_artifacts, backend="torch", device="cpu", compile_mode="fast")


# -- fp32 means IEEE fp32 ---------------------------------------------------------------------


def test_full_fp32_switches_tf32_off_and_restores_what_was_set():
    before = _fp32_switches()
    # an app that allowed TF32 through the legacy switches, as many do
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    allowed = _fp32_switches()
    assert allowed["matmul"] == "tf32" and allowed["conv"] == "tf32"
    try:
        with full_fp32():
            assert set(_fp32_switches().values()) == {"ieee"}
            with full_fp32():
                pass
            assert set(_fp32_switches().values()) == {"ieee"}  # the inner scope did not restore
        assert _fp32_switches() == allowed
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # the legacy API still reads
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.conv.fp32_precision = before["conv"]
        torch.backends.cuda.matmul.fp32_precision = before["matmul"]


def test_overlapping_scopes_on_two_threads_restore_only_when_both_ended():
    before = _fp32_switches()
    inside, release = threading.Event(), threading.Event()

    def hold():
        with full_fp32():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(10)
    with full_fp32():
        pass
    assert set(_fp32_switches().values()) == {"ieee"}  # the other thread's scope is still open
    release.set()
    thread.join(10)
    assert _fp32_switches() == before


def test_the_reference_and_the_torch_backends_fp32_run_in_ieee_fp32(pass_folder):
    folder, unet = pass_folder
    seen = []

    def record(module, args):
        seen.append(torch.backends.cudnn.conv.fp32_precision)

    torch.backends.cudnn.conv.fp32_precision = "tf32"  # what torch defaults to
    try:
        handle = unet.register_forward_pre_hook(record)
        velocity(unet, _latents(1, 32, 16, 24), _latents(1, 32, 8, 12))
        handle.remove()
        with Upscaler.load(folder, backend="torch", device="cpu") as upscaler:
            upscaler.backend._modules["unet"].register_forward_pre_hook(record)
            upscaler.upscale(_latents(1, 32, 8, 12))
        assert seen == ["ieee", "ieee"]
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cudnn.conv.fp32_precision = "tf32"


# -- the torch backend's production modes -----------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_backend_in_reduced_precision_stays_inside_the_gates_limits(pass_folder, precision):
    folder, unet = pass_folder
    x = _latents(2, 32, 8, 12, seed=6)
    expected = reference_upscale(unet, x, 4, seed=9)
    with Upscaler.load(folder, backend="torch", device="cpu", precision=precision) as upscaler:
        assert upscaler.backend_name == f"torch-{precision}"
        got = upscaler.upscale(x, scale=4, seed=9)
        weights = {t.dtype for t in upscaler.backend._modules["unet"].parameters()}
    assert got.dtype == torch.float32 and got.is_contiguous()
    error = _rel_l2(got, expected)
    assert error < THRESHOLDS[precision].rel_l2, error
    assert error > 1e-6  # it did run in reduced precision (fp32 would be ~1e-7)
    assert torch.float32 in weights and {torch.float16, torch.bfloat16} & weights  # fp32 norms, reduced convs


COMPILE_CHILD = """
import json, sys, torch
from torch._dynamo.utils import counters
from runtime import Upscaler
from export.reference import upscale
from export.checkpoint import load_unet
sys.path.insert(0, {root!r})
from tests.conftest import SMALL_UNET
x = torch.randn(1, 32, 8, 12, generator=torch.Generator().manual_seed(2))
with Upscaler.load({folder!r}, backend="torch", device="cpu", compile_mode="default") as upscaler:
    got = upscaler.upscale(x, scale=2, seed=4)
    again = upscaler.upscale(x, scale=2, seed=4)
    compiled = dict((str(k), v) for k, v in upscaler.backend.compile_seconds.items())
reference = upscale(load_unet(random_weights=True, seed=0, **SMALL_UNET), x, 2, seed=4)
print(json.dumps({{"rel_l2": float((got - reference).norm() / reference.norm()), "repeat_equal": torch.equal(got, again),
                  "contiguous": got.is_contiguous(), "compiled": compiled,
                  "cache_hits": counters["inductor"]["fxgraph_cache_hit"]}}))
"""


def test_compiled_torch_backend_matches_the_reference_and_a_second_process_reuses_the_compile(pass_folder, tmp_path):
    import json

    folder, _ = pass_folder
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    code = COMPILE_CHILD.format(root=str(ROOT), folder=str(folder))
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    for run in runs:
        assert run["rel_l2"] < 1e-5 and run["repeat_equal"] and run["contiguous"]
        assert list(run["compiled"]) == ["(1, 32, 8, 12)"]  # one compilation, at the one shape used
    assert runs[0]["cache_hits"] == 0 and runs[1]["cache_hits"] > 0
