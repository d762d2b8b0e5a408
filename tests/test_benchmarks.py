"""``python -m benchmarks.latency`` on the CPU at small sizes (small configuration)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.latency import main
from engines.targets import PRESETS
from export.build import BuildSettings, build_artifacts
from export.checkpoint import load_unet
from export.onnx.components import Models

from .conftest import SMALL_UNET


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_artifacts")
    settings = BuildSettings(
        target=PRESETS["rtx4090"].with_range(64, 512), precision="fp16", vae_precision="fp32",
        components=("cond_encoder", "unet"), weights={"unet": {"source": "random", "seed": 0}},
    )
    build_artifacts(Models(unet=load_unet(random_weights=True, seed=0, **SMALL_UNET)), settings, out, log=lambda line: None)
    return out


def test_cpu_run_writes_json_markdown_and_png_and_reports_what_it_skipped(artifacts, tmp_path, capsys):
    paths = {k: tmp_path / f"bench.{k}" for k in ("json", "md", "png")}
    code = main([
        "--artifacts", str(artifacts), "--device", "cpu", "--backends", "eager-fp32,onnxruntime,eager-fp16,tensorrt",
        "--sizes", "256,512", "--components", "unet,pipeline,vae_decoder", "--runs", "2", "--warmup", "1",
        "--json", str(paths["json"]), "--markdown", str(paths["md"]), "--plot", str(paths["png"]),
    ])
    assert code == 0
    result = json.loads(paths["json"].read_text())
    rows = {(r["backend"], r["component"], r["size"]): r for r in result["rows"]}
    assert set(rows) == {(b, c, s) for b in ("eager-fp32", "onnxruntime") for c in ("unet", "pipeline") for s in (256, 512)}
    for row in rows.values():
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"] and row["runs"] == 2
        assert row["tflops"] == pytest.approx(row["flops"] / (row["median_ms"] * 1e-3) / 1e12)
    # FLOPs scale with area (attention-free), the same for every backend at a size
    unet = rows[("eager-fp32", "unet", 512)]["flops"]
    assert unet == pytest.approx(4 * rows[("eager-fp32", "unet", 256)]["flops"], rel=0.01)
    assert rows[("onnxruntime", "unet", 512)]["flops"] == unet
    reasons = {(s["backend"], s.get("component")): s["reason"] for s in result["skipped"]}
    assert "TensorRT is not installed" in reasons[("tensorrt", None)]
    assert "GPU benchmark" in reasons[("eager-fp16", None)]
    assert "no vae_decoder" in reasons[("eager-fp32", "vae_decoder")]
    assert result["machine"]["device"] == "cpu" and result["published"]["median_ms"] == 8.09
    table = paths["md"].read_text()
    assert "| eager-fp32 | unet | 512 |" in table and "Different GPUs" not in table
    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and image.size[0] > 100


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backends", "eager-fp32,openvino"], "unknown openvino"),
        (["--sizes", "1000"], "multiples of 32"),
        (["--components", "unet,attention"], "unknown attention"),
    ],
)
def test_bad_arguments_exit_2(artifacts, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--artifacts", str(artifacts), "--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_artifacts_exit_1(tmp_path, capsys):
    assert main(["--artifacts", str(tmp_path), "--device", "cpu"]) == 1
    assert "has no manifest.json" in capsys.readouterr().err
