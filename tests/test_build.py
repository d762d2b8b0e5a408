"""``export.build`` end to end on the small configuration, without TensorRT 10/11 (TensorRT-RTX
builds: tests/test_tensorrt_rtx.py). The builds here ask for the TensorRT flavour, whose engines
cannot be built on this machine, so they show the ONNX-only path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engines.manifest import MANIFEST_NAME, load_manifest
from engines.profiles import ProfileError
from engines.targets import PRESETS
from engines.tensorrt_build import BuildOptions, tensorrt_version
from export.build import _rebuild_command, build_parser, main
from export.checkpoint import random_vae, seeded_init
from export.models import UpscalerUNet
from export.onnx.components import Models
from export.pipeline import graph, profiles
from export.pipeline.driver import build_artifacts
from export.pipeline.errors import BuildError
from export.pipeline.settings import BuildSettings
from export.reference import upscale as reference_upscale
from runtime import Upscaler

from .conftest import SMALL_UNET, SMALL_VAE

pytestmark = pytest.mark.skipif(
    tensorrt_version() is not None, reason="these tests expect the ONNX-only build of a machine without TensorRT"
)

# 64 px in (latent 8) .. 512 px out (latent 64): three octaves for the small models.
TARGET = PRESETS["rtx4090"].with_range(64, 512)


def _models(seed: int = 0) -> Models:
    unet = seeded_init(lambda: UpscalerUNet(**SMALL_UNET), seed).eval()
    return Models(unet=unet, vae=random_vae(seed, **SMALL_VAE))


def _settings(**overrides) -> BuildSettings:
    return BuildSettings(**{"target": TARGET, "precision": "fp16", "vae_precision": "bf16", "engine_flavour": "tensorrt",
                            **overrides})


def _files(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("artifacts")
    log: list[str] = []
    build_artifacts(_models(), _settings(), out, log=log.append)
    return out, log


def test_onnx_only_build_writes_verified_manifest_and_report(built):
    out, log = built
    manifest = load_manifest(out)
    assert set(manifest.components) == {"cond_encoder", "unet", "vae_decoder"}
    unet = manifest.components["unet"]
    assert unet.precision == "fp16" and manifest.components["vae_decoder"].precision == "bf16"
    assert unet.validation["status"] == "passed"
    assert manifest.components["vae_decoder"].validation["status"] == "not_run"
    assert [p.opt["sample"][2:] for p in unet.profiles] == [(16, 16), (32, 32), (64, 64)]
    assert [p.max["latents_small"][2:] for p in manifest.components["cond_encoder"].profiles] == [(8, 8), (16, 16), (32, 32)]
    assert manifest.components["vae_decoder"].profiles[0].max["latents"][2:] == (64, 64)
    for record in manifest.components.values():
        assert not record.engine.built and "TensorRT is not installed" in record.engine.reason
        assert len(record.memory_estimate_bytes) == len(record.profiles)
    # config and digest always; the source only when the CLI loaded the weights
    assert set(manifest.weights) == {"unet", "vae"} and "source" not in manifest.weights["unet"]
    assert manifest.weights["unet"]["config"]["base_channels"] == 32 and len(manifest.weights["vae"]["sha256"]) == 64
    report = json.loads((out / "report.json").read_text())
    assert {s["stage"] for s in report["stages"]} == {"onnx", "profiles", "accuracy", "check set"}
    assert not list(out.rglob("*.partial")) and not list(out.rglob(".staging*"))


def test_rerun_with_unchanged_inputs_reuses_every_graph(built, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    before = _files(out)
    log: list[str] = []
    build_artifacts(_models(), _settings(), out, log=log.append)
    assert sum("onnx: reused (unchanged inputs)" in line for line in log) == 3
    after = _files(out)
    assert {k: v for k, v in after.items() if k.startswith("onnx/")} == {k: v for k, v in before.items() if k.startswith("onnx/")}


def test_changed_weights_reexport_only_what_they_feed(built, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    models = _models()
    models.unet = seeded_init(lambda: UpscalerUNet(**SMALL_UNET), 1).eval()
    log: list[str] = []
    build_artifacts(models, _settings(), out, log=log.append)
    reused = [line for line in log if "reused" in line]
    assert len(reused) == 1  # the VAE decoder
    assert load_manifest(out).components["unet"].onnx_sha256 != load_manifest(built[0]).components["unet"].onnx_sha256


def test_failure_mid_way_leaves_no_half_written_files_and_the_old_manifest(built, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    old_manifest = (out / MANIFEST_NAME).read_bytes()
    real = profiles.derive_profiles

    def failing(component, *args):
        if component == "unet":
            raise ProfileError("simulated failure")
        return real(component, *args)

    monkeypatch.setattr(profiles, "derive_profiles", failing)
    models = _models(seed=1)  # new weights, so the graphs are exported again before the failure
    with pytest.raises(ProfileError, match="simulated"):
        build_artifacts(models, _settings(), out, log=lambda line: None)
    assert (out / MANIFEST_NAME).read_bytes() == old_manifest
    load_manifest(out)  # every file it names is still there with its hash: the folder is usable
    assert not list(out.rglob("*.partial")) and not list(out.rglob(".staging*"))


def test_failure_in_a_fresh_folder_writes_no_manifest(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(graph, "export_and_validate", failing)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        build_artifacts(_models(), _settings(), tmp_path, log=lambda line: None)
    assert not (tmp_path / MANIFEST_NAME).exists() and not (tmp_path / "report.json").exists()
    assert not list(tmp_path.rglob("*.onnx*"))


def test_failed_validation_stops_the_build(tmp_path, monkeypatch):
    def failed(models, component, precision, out):
        return {"status": "failed"}

    monkeypatch.setattr(graph, "export_and_validate", failed)
    with pytest.raises(BuildError, match="cond_encoder \\(fp16\\) failed validation against the fp32 eager model"):
        build_artifacts(_models(), _settings(), tmp_path, log=lambda line: None)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_require_engines_fails_before_any_work(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(BuildError, match="--require-engines: engines cannot be built here: TensorRT is not installed"):
        build_artifacts(_models(), _settings(require_engines=True), out, log=lambda line: None)
    assert not out.exists()


def test_cli_full_size_encoder_completes_the_onnx_stages_and_says_what_to_run(tmp_path, capsys):
    out = tmp_path / "art"
    code = main(["--target", "rtx4090", "--engine-flavour", "tensorrt", "--random-weights", "--components",
                 "cond_encoder", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "engines not built (TensorRT is not installed" in printed
    assert (f"python -m export.build --target rtx4090 --random-weights --seed 0 --out {out} --components cond_encoder "
            "--engine-flavour tensorrt") in printed
    manifest = load_manifest(out)
    assert manifest.weights["unet"]["source"] == "random" and len(manifest.weights["unet"]["sha256"]) == 64
    assert [p.opt["latents_small"][2:] for p in manifest.components["cond_encoder"].profiles] == [
        (64, 64), (128, 128), (256, 256), (512, 512)
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--min-px", "500"], "multiple of"),
        (["--max-px", "256"], "at least twice"),
        (["--max-batch", "0"], "argument --max-batch: 0 is outside the accepted range 1..64"),
        (["--max-batch", "20000"], "argument --max-batch: 20000 is outside the accepted range 1..64"),
        (["--min-px", "0"], "argument --min-px: 0 is outside the accepted range 16..65536"),
        (["--workspace-gib", "-1"], "argument --workspace-gib: -1 is outside the accepted range"),
        (["--seed", str(2**70)], "argument --seed: 1180591620717411303424 is outside the accepted range 0..18446744073709551615"),
        (["--calib-size", "0"], "argument --calib-size: 0 is outside the accepted range 1..10000"),
    ],
)
def test_cli_bad_ranges_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", "rtx4090", "--random-weights", "--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_float_builds_record_the_pass_accuracy_in_the_report(built):
    out, log = built
    accuracy = json.loads((out / "report.json").read_text())["accuracy"]
    assert accuracy["precision"] == "fp16" and accuracy["passed"] and len(accuracy["samples"]) == 4
    assert accuracy["gated"] == "onnx graphs on onnxruntime (cpu)"  # no engines here: the graphs were gated
    assert 0 < accuracy["worst"]["rel_l2"] < 5e-3
    assert accuracy["worst"]["psnr_db"] > 45  # both outputs decoded by the fp32 eager VAE
    assert any(line.startswith("accuracy of one pass (fp16 graphs vs fp32 eager)") for line in log)


def test_int8_build_quantizes_gates_and_reuses(tmp_path):
    settings = _settings(precision="int8", components=("cond_encoder", "unet"))
    log: list[str] = []
    manifest = build_artifacts(_models(), settings, tmp_path, log=log.append)
    for name in ("cond_encoder", "unet"):
        record = manifest.components[name]
        assert record.precision == "int8" and record.onnx_file == f"onnx/{record.onnx_key}/{name}.int8.onnx"
        assert record.validation["accuracy"]["passed"] and record.validation["quantization"]["quantized_nodes"] > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert 1e-4 < report["accuracy"]["worst"]["rel_l2"] <= 0.06
    assert report["accuracy"]["calibration"]["source"].startswith("fallback")
    # the runtime runs the quantized folder, close to the fp32 eager reference
    latents = torch.randn(1, 32, 8, 12, generator=torch.Generator().manual_seed(3))
    with Upscaler.load(tmp_path, backend="onnxruntime", device="cpu") as upscaler:
        got = upscaler.upscale(latents, scale=2, seed=5)
    expected = reference_upscale(_models().unet, latents, scale=2, seed=5)
    assert 1e-4 < float((got - expected).norm() / expected.norm()) <= 0.06
    before = _files(tmp_path)
    log.clear()
    build_artifacts(_models(), settings, tmp_path, log=log.append)
    assert "reused (unchanged inputs)" in log[1]  # the quantize stage, gate included
    assert {k: v for k, v in _files(tmp_path).items() if k.endswith(".onnx")} == {
        k: v for k, v in before.items() if k.endswith(".onnx")}


def test_int8_build_that_fails_the_gate_writes_nothing(built, tmp_path, monkeypatch):
    from calib import accuracy

    out = tmp_path / "artifacts"
    shutil.copytree(built[0], out)
    before = _files(out)
    monkeypatch.setitem(accuracy.THRESHOLDS, "int8", accuracy.Thresholds(rel_l2=1e-6, max_abs=1e-6, psnr_db=200))
    with pytest.raises(BuildError, match=r"failed the accuracy gate, nothing was written: int8 accuracy .* rel-L2"):
        build_artifacts(_models(), _settings(precision="int8"), out, log=lambda line: None)
    assert _files(out) == before  # the old fp16 manifest and graphs, untouched; no int8 graph
    assert load_manifest(out).components["unet"].precision == "fp16"


def test_cli_refuses_fp8_below_compute_capability_8_9_and_quantizing_one_component(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", "rtx3090", "--random-weights", "--precision", "fp8", "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2 and "fp8 needs compute capability >= 8.9" in capsys.readouterr().err
    with pytest.raises(BuildError, match="quantize cond_encoder and unet together"):
        build_artifacts(_models(), _settings(precision="int8", components=("unet",)), tmp_path, log=lambda line: None)
    assert not (tmp_path / "a").exists()


def test_tf32_is_off_unless_asked_for_and_recorded(built, tmp_path):
    assert load_manifest(built[0]).build_options["tf32"] is False
    settings = _settings(components=("cond_encoder",), options=BuildOptions(tf32=True))
    assert build_artifacts(_models(), settings, tmp_path, log=lambda line: None).build_options["tf32"] is True
    args = build_parser().parse_args(["--target", "rtx4090", "--random-weights", "--tf32"])
    assert "--tf32" in _rebuild_command(args, PRESETS["rtx4090"], tmp_path)
    assert "--tf32" not in _rebuild_command(build_parser().parse_args(["--target", "rtx4090"]), PRESETS["rtx4090"], tmp_path)


def test_cli_refuses_an_output_that_is_a_file_before_any_work(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("a user's file")
    assert main(["--target", "rtx4090", "--random-weights", "--out", str(target)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: --out {target} is a file, not a folder; name a folder for the artifacts\n"
    assert target.read_text() == "a user's file"
