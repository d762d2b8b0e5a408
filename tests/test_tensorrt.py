"""TensorRT build and load-and-run against the fp32 eager reference. Needs TensorRT and a CUDA GPU.

Written against the TensorRT 10/11 API and not yet run on real hardware (README says so): these
are the checks for the first machine that has both.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from calib import accuracy
from engines.manifest import load_manifest
from engines.profiles import Profile
from engines.targets import detect_target
from engines.tensorrt_build import ACTIVATION_RESIZE_FEATURE, BuildOptions, build_engine, local_gpu, tensorrt_version
from export.build import BuildError, BuildSettings, build_artifacts
from export.onnx.components import COMPONENTS, Models
from export.onnx.exporter import example_inputs, export_component
from export.models.precision import DEFAULT_POLICY

from .test_profile_coverage import admitted_inputs

pytestmark = [
    pytest.mark.skipif(tensorrt_version() is None, reason="TensorRT is not installed (its libraries ship only for GPU machines)"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU"),
]

MIN_PX, MAX_PX = 64, 512  # low-res latent sides 8..32 in three cond_encoder profiles, samples 16..64


def _rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def engines_folder(tmp_path_factory, small_models):
    out = tmp_path_factory.mktemp("trt_artifacts")
    settings = BuildSettings(
        target=detect_target().with_range(MIN_PX, MAX_PX), precision="fp16", vae_precision="fp32",
        components=("cond_encoder", "unet", "vae_decoder"),
    )
    build_artifacts(small_models, settings, out, log=lambda line: None)
    return out


def test_small_unet_engine_matches_onnx_runtime(small_unet, tmp_path):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    spec, models = COMPONENTS["unet"], Models(unet=small_unet)
    graph = export_component(spec, models, "fp16", tmp_path / "unet.fp16.onnx").path
    shapes = [spec.input_shapes(models, 1, s, s) for s in (16, 32)]
    profile = Profile("unet:32", shapes[0], shapes[1], spec.input_shapes(models, 2, 32, 32))
    engine_path, cache_path = tmp_path / "unet.plan", tmp_path / "timing.cache"
    facts = build_engine("unet", graph, [profile], BuildOptions(), engine_path, cache_path, report=lambda line: None)
    assert engine_path.stat().st_size > 0 and cache_path.stat().st_size > 0
    assert facts["build_seconds"] >= 0 and facts["tf32"] is False

    inputs = example_inputs(spec, models, DEFAULT_POLICY["fp16"], (1, 24, 28), seed=5)
    feed = {name: x.numpy() for name, x in zip(spec.inputs, inputs)}
    with OnnxrtRunner(SessionFromOnnx(str(graph))) as ort, TrtRunner(EngineFromBytes(engine_path.read_bytes())) as trt:
        expected = ort.infer(feed)["velocity"].astype(np.float64)
        got = trt.infer(feed)["velocity"].astype(np.float64)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-2


def test_build_records_engines_settings_and_the_engine_gate(engines_folder, small_models):
    gpu = local_gpu()
    manifest = load_manifest(engines_folder, engines=True, tensorrt_version=tensorrt_version(),
                             compute_capability=gpu.compute_capability)
    assert all(r.engine.built for r in manifest.components.values())
    assert manifest.build_options["tf32"] is False
    import tensorrt as trt

    resize = hasattr(trt.PreviewFeature, ACTIVATION_RESIZE_FEATURE)
    for record in manifest.components.values():
        assert record.engine.facts["preview_features"] == ([ACTIVATION_RESIZE_FEATURE] if resize else [])
    report = json.loads((engines_folder / "report.json").read_text())
    assert report["accuracy"]["gated"].startswith("tensorrt engines") and report["accuracy"]["passed"]


def test_rebuild_reuses_engines(engines_folder, small_models, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(engines_folder, out)
    settings = BuildSettings(
        target=detect_target().with_range(MIN_PX, MAX_PX), precision="fp16", vae_precision="fp32",
        components=("cond_encoder", "unet", "vae_decoder"),
    )
    log: list[str] = []
    build_artifacts(small_models, settings, out, log=log.append)
    assert sum("engine: reused" in line for line in log) == 3


def test_engines_that_fail_the_gate_are_deleted_and_the_old_manifest_stays(engines_folder, small_models, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(engines_folder, out)
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setitem(accuracy.THRESHOLDS, "fp16", accuracy.Thresholds(rel_l2=1e-12, max_abs=1e-12, psnr_db=500.0))
    settings = BuildSettings(
        target=detect_target().with_range(MIN_PX, MAX_PX), precision="fp16", vae_precision="fp32",
        components=("cond_encoder", "unet"), options=BuildOptions(optimization_level=2),  # new engines
    )
    with pytest.raises(BuildError, match=r"failed the accuracy gate: .* Deleted engines/cond_encoder.*the folder keeps its previous manifest"):
        build_artifacts(small_models, settings, out, log=lambda line: None)
    assert (out / "manifest.json").read_bytes() == before
    named = {r.engine.file for r in load_manifest(out).components.values()}
    assert {f"engines/{p.name}" for p in (out / "engines").glob("*.plan")} == named


def test_chain_alternates_profiles_replays_graphs_and_matches_the_reference(engines_folder, small_models):
    from export.reference import upscale as reference_upscale
    from runtime import Upscaler

    assert (8, 12) in admitted_inputs(MIN_PX, MAX_PX, 4)  # the request is inside the build's range
    x = torch.randn(1, 32, 8, 12, generator=torch.Generator().manual_seed(1))
    expected = reference_upscale(small_models.unet, x, 4, seed=2)
    with Upscaler.load(engines_folder, backend="tensorrt", device="cuda") as upscaler:
        runs = [upscaler.upscale(x.cuda(), scale=4, seed=2).cpu() for _ in range(4)]  # graphs captured by run 3
        backend = upscaler.backend
        unet = backend._engines["unet"]
        # the two passes ran on different profiles (sample 16x24 and 32x48), each launch on its own context
        assert len(unet.launches) == 2 and all(l.graph is not None for l in unet.launches.values())
        assert upscaler.memory_bytes() > 0
    for got in runs:
        assert _rel_l2(got, expected) < 1e-2
    assert all(torch.equal(runs[0], got) for got in runs[1:])


def test_scratch_is_sized_for_the_shapes_run_not_the_profile_maximum(engines_folder):
    import tensorrt as trt

    from runtime import Upscaler

    if not hasattr(trt.PreviewFeature, ACTIVATION_RESIZE_FEATURE):
        pytest.skip(f"TensorRT {trt.__version__} has no {ACTIVATION_RESIZE_FEATURE}")
    with Upscaler.load(engines_folder, backend="tensorrt", device="cuda") as upscaler:
        upscaler.upscale(torch.randn(1, 32, 8, 8, device="cuda"), scale=2)  # batch 1 in profiles 0 (batch up to 4)
        engines = upscaler.backend._engines
        at_profile_maximum = max(engines[c].engine.get_device_memory_size_for_profile_v2(0) for c in ("cond_encoder", "unet"))
        assert 0 < upscaler.backend._scratch.numel() < at_profile_maximum


def test_returned_tensors_own_their_memory(engines_folder):
    from runtime import Upscaler

    with Upscaler.load(engines_folder, backend="tensorrt", device="cuda") as upscaler:
        a, b = (torch.randn(1, 32, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(s)) for s in (1, 2))
        for call in (lambda x: upscaler.decode(x), lambda x: upscaler.upscale(x, seed=0)):
            kept = call(a)
            copy = kept.clone()
            for _ in range(3):  # the third call replays a graph into the same output buffers
                call(b)
            assert torch.equal(kept, copy)


def test_inputs_of_the_wrong_type_or_device_are_refused(engines_folder):
    from runtime import Upscaler

    with Upscaler.load(engines_folder, backend="tensorrt", device="cuda") as upscaler:
        latents = torch.randn(1, 32, 8, 8, device="cuda")
        timestep = torch.full((1,), 1000.0, device="cuda")
        with pytest.raises(TypeError, match="cond_encoder input latents_small is torch.float16, the engine takes torch.float32"):
            upscaler.backend.run("cond_encoder", {"latents_small": latents.half(), "timestep": timestep})
        with pytest.raises(ValueError, match="outside every profile"):
            upscaler.backend.run("cond_encoder", {"latents_small": torch.randn(1, 32, 6, 8, device="cuda"), "timestep": timestep})


def test_launches_are_bounded_and_counted(engines_folder):
    from runtime import Upscaler
    from runtime.backends.tensorrt import MAX_LAUNCHES

    with Upscaler.load(engines_folder, backend="tensorrt", device="cuda") as upscaler:
        base = upscaler.memory_bytes()
        for side in range(8, 8 + 2 * (MAX_LAUNCHES + 3), 2):
            upscaler.upscale(torch.randn(1, 32, side, 8, device="cuda"), scale=2)
        assert len(upscaler.backend._engines["unet"].launches) == MAX_LAUNCHES
        assert upscaler.memory_bytes() > base


def test_calls_from_threads_on_their_own_streams_match_their_sequential_results(engines_folder):
    from runtime import Upscaler

    with Upscaler.load(engines_folder, backend="tensorrt", device="cuda") as upscaler:
        inputs = [torch.randn(1, 32, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(s)) for s in range(6)]
        expected = [upscaler.upscale(x, seed=i).cpu() for i, x in enumerate(inputs)]
        results: dict[int, torch.Tensor] = {}

        def work(i: int) -> None:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                out = upscaler.upscale(inputs[i], seed=i)
                results[i] = out.to("cpu", non_blocking=False)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(len(inputs)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_engines_load_and_run_on_the_upscalers_device_not_the_current_one(engines_folder):
    from runtime import Upscaler

    if torch.cuda.get_device_capability(0) != torch.cuda.get_device_capability(1):
        pytest.skip("the two GPUs differ in compute capability")
    with torch.cuda.device(0), Upscaler.load(engines_folder, backend="tensorrt", device="cuda:1") as upscaler:
        out = upscaler.upscale(torch.randn(1, 32, 8, 8, device="cuda:1"), scale=2)
        assert out.device == torch.device("cuda:1") and torch.isfinite(out).all()
