"""TensorRT build and load-and-run against ONNX Runtime. Needs TensorRT and a CUDA GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.manifest import load_manifest
from engines.profiles import Profile
from engines.targets import detect_target
from engines.tensorrt_build import BuildOptions, build_engine, local_gpu, tensorrt_version
from export.build import BuildSettings, build_artifacts
from export.onnx.components import COMPONENTS, Models
from export.onnx.exporter import example_inputs, export_component
from export.onnx.precision import DEFAULT_POLICY

pytestmark = [
    pytest.mark.skipif(tensorrt_version() is None, reason="TensorRT is not installed (its libraries ship only for GPU machines)"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU"),
]


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
    assert facts["build_seconds"] >= 0

    inputs = example_inputs(spec, models, DEFAULT_POLICY["fp16"], (1, 24, 28), seed=5)
    feed = {name: x.numpy() for name, x in zip(spec.inputs, inputs)}
    with OnnxrtRunner(SessionFromOnnx(str(graph))) as ort, TrtRunner(EngineFromBytes(engine_path.read_bytes())) as trt:
        expected = ort.infer(feed)["velocity"].astype(np.float64)
        got = trt.infer(feed)["velocity"].astype(np.float64)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-2


def test_build_on_this_gpu_records_and_reuses_engines(small_unet, tmp_path):
    target = detect_target().with_range(64, 256)
    settings = BuildSettings(target=target, precision="fp16", vae_precision="fp32", components=("cond_encoder", "unet"))
    build_artifacts(Models(unet=small_unet), settings, tmp_path, log=lambda line: None)
    gpu = local_gpu()
    manifest = load_manifest(tmp_path, engines=True, tensorrt_version=tensorrt_version(), compute_capability=gpu.compute_capability)
    assert all(r.engine.built for r in manifest.components.values())
    log: list[str] = []
    build_artifacts(Models(unet=small_unet), settings, tmp_path, log=log.append)
    assert sum("engine: reused" in line for line in log) == 2


def test_runtime_tensorrt_backend_matches_the_reference_and_replays(small_unet, tmp_path):
    from export.reference import upscale as reference_upscale
    from runtime import Upscaler

    target = detect_target().with_range(64, 256)
    settings = BuildSettings(target=target, precision="fp16", vae_precision="fp32", components=("cond_encoder", "unet"))
    build_artifacts(Models(unet=small_unet), settings, tmp_path, log=lambda line: None)
    x = torch.randn(1, 32, 8, 12, generator=torch.Generator().manual_seed(1))
    expected = reference_upscale(small_unet, x, 4, seed=2)
    with Upscaler.load(tmp_path, backend="tensorrt", device="cuda") as upscaler:
        runs = [upscaler.upscale(x.cuda(), scale=4, seed=2).cpu() for _ in range(3)]  # 3rd run replays a graph
        assert upscaler.memory_bytes() > 0
    for got in runs:
        assert float((got - expected).norm() / expected.norm()) < 1e-2
    assert torch.equal(runs[1], runs[2])
