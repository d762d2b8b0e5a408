"""``python -m benchmarks.latency`` and ``benchmarks.memory`` on the CPU at small sizes (small configuration)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.latency import main
from benchmarks.memory import ChainEstimate
from benchmarks.memory import main as memory_main
from export.accuracy import main as accuracy_main
from engines.manifest import EngineRecord, load_manifest
from runtime import Upscaler
from runtime.cpu import cpu_matrix_units

@pytest.fixture(scope="module")
def artifacts(small_artifacts):
    return small_artifacts


def test_cpu_run_writes_json_markdown_and_png_and_reports_what_it_skipped(artifacts, tmp_path, capsys):
    paths = {k: tmp_path / f"bench.{k}" for k in ("json", "md", "png")}
    code = main([
        "--artifacts", str(artifacts), "--device", "cpu", "--backends", "eager-fp32,onnxruntime,auto,eager-fp16,tensorrt",
        "--sizes", "256,512", "--components", "cond_encoder,unet,pipeline,backend_pass,vae_decoder", "--runs", "2", "--warmup", "1",
        "--json", str(paths["json"]), "--markdown", str(paths["md"]), "--plot", str(paths["png"]),
    ])
    assert code == 0
    result = json.loads(paths["json"].read_text())
    auto = [r for r in result["rows"] if r["backend"] == "auto"]
    with Upscaler.load(artifacts, device="cpu") as chosen:  # auto rows run what Upscaler.load chooses here
        assert {r["runs_as"] for r in auto} == {chosen.backend_name}
    rows = {(r["backend"], r["component"], r["size"]): r for r in result["rows"] if r["backend"] != "auto"}
    components = ("cond_encoder", "unet", "pipeline", "vae_decoder")
    assert set(rows) == {(b, c, s) for b in ("eager-fp32", "onnxruntime") for c in components for s in (256, 512)} | {
        ("onnxruntime", "backend_pass", s) for s in (256, 512)}
    machine = result["machine"]  # the CPU's measured peaks: bf16 with bf16 units, else fp32, is what % peak is against
    assert machine["peak_tflops_fp32_measured"] > 0 and machine["peak_tflops_bf16_measured"] > 0
    peak = machine[f"peak_tflops_{'bf16' if cpu_matrix_units().bf16 else 'fp32'}_measured"]
    assert result["baseline"] == "onnxruntime"
    for (backend, component, size), row in rows.items():
        assert row["percent_of_peak"] == pytest.approx(100 * row["tflops"] / peak)
        if backend == "onnxruntime":
            assert row["speedup"] == 1.0
    for size in (256, 512):  # the pass's x0 against fp32 eager: within the fp16 graphs' gate, and not exact
        assert 1e-6 < rows[("onnxruntime", "pipeline", size)]["x0_rel_l2"] < 5e-3
        assert 1e-6 < next(r for r in auto if r["component"] == "pipeline" and r["size"] == size)["x0_rel_l2"] < 3e-2
    for (backend, component, _), row in rows.items():
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"] and row["runs"] == 2
        assert row["first_call_ms"] > 0
        # only the runtime backend's pipeline goes through Upscaler.upscale; on the CPU with its convention
        assert row["through_runtime"] == (backend in ("onnxruntime", "auto") and component == "pipeline")
        assert row["noise"] == ("cpu" if row["through_runtime"] else None)
        assert row["tflops"] == pytest.approx(row["flops"] / (row["median_ms"] * 1e-3) / 1e12)
    # FLOPs scale with area (attention-free), the same for every backend at a size
    unet = rows[("eager-fp32", "unet", 512)]["flops"]
    assert unet == pytest.approx(4 * rows[("eager-fp32", "unet", 256)]["flops"], rel=0.01)
    assert rows[("onnxruntime", "unet", 512)]["flops"] == unet
    # the runtime's overhead: Upscaler.upscale minus the backend's pass alone, for the runtime backend only
    overhead = {(o["backend"], o["size"]): o for o in result["overhead"]}
    assert set(overhead) == {(b, s) for b in ("onnxruntime", "auto") for s in (256, 512)}
    for (backend, size), o in overhead.items():
        if backend == "auto":
            continue
        alone = rows[(backend, "backend_pass", size)]["median_ms"]
        assert o["overhead_ms"] == pytest.approx(rows[(backend, "pipeline", size)]["median_ms"] - alone)
    assert rows[("onnxruntime", "backend_pass", 512)]["flops"] == rows[("onnxruntime", "pipeline", 512)]["flops"]
    reasons = {(s["backend"], s.get("component")): s["reason"] for s in result["skipped"]}
    # the folder's engines are TensorRT-RTX ones (built here, for 8.9): they need the GPU
    assert reasons[("tensorrt", None)] == "TensorRT-RTX needs a CUDA GPU, and this machine has none (cpu asked)"
    assert "GPU benchmark" in reasons[("eager-fp16", None)]
    assert "a runtime backend's row" in reasons[("eager-fp32", "backend_pass")]
    # one tile each (the profile's tile is 64 latent pixels); the mid-block attention grows faster than the area
    assert rows[("eager-fp32", "vae_decoder", 512)]["flops"] > 4 * rows[("eager-fp32", "vae_decoder", 256)]["flops"]
    assert result["machine"]["device"] == "cpu" and result["published"]["median_ms"] == 8.09
    table = paths["md"].read_text()
    assert "| eager-fp32 | unet | no | 512 |" in table and "| onnxruntime | pipeline | yes (cpu) | 512 |" in table
    assert "Different GPUs" not in table
    assert "Runtime overhead, onnxruntime at 512 px" in table
    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and image.size[0] > 100


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backends", "eager-fp32,openvino"], "unknown openvino"),
        (["--sizes", "1000"], "multiples of 32"),
        (["--components", "unet,attention"], "unknown attention"),
        (["--runs", "0"], "argument --runs: 0 is outside the accepted range 1..10000"),
        (["--warmup", "-1"], "argument --warmup: -1 is outside the accepted range 0..1000"),
    ],
)
def test_bad_arguments_exit_2(artifacts, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--artifacts", str(artifacts), "--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_artifacts_exit_1(tmp_path, capsys):
    assert main(["--artifacts", str(tmp_path), "--device", "cpu"]) == 1
    assert "has no manifest.json" in capsys.readouterr().err


def test_memory_benchmark_estimates_every_stage_of_the_chain_on_cpu(artifacts, tmp_path):
    paths = {k: tmp_path / f"memory.{k}" for k in ("json", "md")}
    code = memory_main([
        "--artifacts", str(artifacts), "--device", "cpu", "--input-px", "64", "--scale", "8",
        "--json", str(paths["json"]), "--markdown", str(paths["md"]),
    ])
    assert code == 0
    result = json.loads(paths["json"].read_text())
    stages = [r["stage"] for r in result["rows"]]
    assert stages == ["pass 64->128 px", "pass 128->256 px", "pass 256->512 px", "decode 512 px"]
    estimates = [r["estimate"] for r in result["rows"]]
    for e in estimates:
        assert e["total_bytes"] == e["activations_bytes"] + e["weights_bytes"] + e["held_bytes"] > 0
    # the folder's engines report their activation memory per profile: the estimate takes those
    manifest = load_manifest(artifacts)
    reported = {p.name: b for r in manifest.components.values()
                for p, b in zip(r.profiles, r.engine.facts["activation_bytes_per_profile"])}
    assert estimates[2]["sources"] == {"cond_encoder": "engine (cond_encoder:32)", "unet": "engine (unet:64)"}
    assert estimates[2]["activations_bytes"] == max(reported["cond_encoder:32"], reported["unet:64"])
    # held across the last pass: its fp32 input (32x32) and output (32x64x64) latents
    assert estimates[2]["held_bytes"] == 4 * 32 * (32 * 32 + 64 * 64)
    assert result["estimate_peak_bytes"] == max(e["total_bytes"] for e in estimates)
    assert "measured only on CUDA" in result["skipped"][0]["reason"]
    assert "inside the goal of 24 GB" in paths["md"].read_text()


def test_without_engine_figures_the_estimate_comes_from_the_graphs(artifacts):
    manifest = load_manifest(artifacts)
    for record in manifest.components.values():
        record.engine = EngineRecord(reason="not built here")
    estimates = [ChainEstimate(artifacts, manifest).stage("pass", size) for size in (256, 512)]
    assert estimates[1]["sources"] == {"cond_encoder": "onnx estimate", "unet": "onnx estimate"}
    # attention-free passes: activations grow with the area, x4 per octave
    assert 3.5 < estimates[1]["activations_bytes"] / estimates[0]["activations_bytes"] < 4.2


def test_tiled_decode_estimate_stays_at_one_tile_as_the_image_grows(artifacts):
    manifest = load_manifest(artifacts)
    estimate = ChainEstimate(artifacts, manifest)
    tile_px = estimate.tile_side() * 8
    small, large = estimate.stage("decode", 2 * tile_px), estimate.stage("decode", 4 * tile_px)
    assert small["activations_bytes"] == large["activations_bytes"]
    # the full fp32 image and blend weights grow with the area; the latents too
    assert large["held_bytes"] == 4 * small["held_bytes"]


def test_memory_benchmark_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_main(["--artifacts", str(tmp_path), "--device", "cpu", "--input-px", "1000"])
    assert exit_info.value.code == 2 and "multiple of 16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        memory_main(["--artifacts", str(tmp_path), "--device", "cpu", "--scale", "3"])
    assert exit_info.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err
    assert memory_main(["--artifacts", str(tmp_path), "--device", "cpu"]) == 1
    assert "has no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("command", [main, memory_main, accuracy_main])
def test_outputs_inside_the_artifact_folder_or_in_missing_folders_are_refused_before_any_work(artifacts, tmp_path, capsys, command):
    before = sorted(p.name for p in artifacts.rglob("*"))
    assert command([str(artifacts), "--json", str(artifacts / "manifest.json")] if command is accuracy_main
                   else ["--artifacts", str(artifacts), "--json", str(artifacts / "manifest.json")]) == 1
    assert "is inside the artifact folder" in capsys.readouterr().err
    missing = str(tmp_path / "nowhere" / "out.json")
    assert command([str(artifacts), "--json", missing] if command is accuracy_main
                   else ["--artifacts", str(artifacts), "--json", missing]) == 1
    assert "does not exist; create it first" in capsys.readouterr().err
    assert sorted(p.name for p in artifacts.rglob("*")) == before
    load_manifest(artifacts)
