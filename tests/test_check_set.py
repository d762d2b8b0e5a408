"""The check set (issue 22 item 5): what the build stores, ``python -m runtime.check`` on ONNX Runtime's
CPU provider (which shows the check set itself is right), a check set altered on purpose, and reuse."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calib.data import load_calibration_set
from engines.manifest import MANIFEST_NAME, load_manifest, read_manifest, sha256_file
from engines.targets import PRESETS
from export.build import BuildSettings, build_artifacts
from export.models import ConditioningEncoder, UNetBody
from export.pipeline.folder import ArtifactFolder
from export.reference import upscale as reference_upscale
from runtime import Upscaler
from runtime.checkset import run_check_set
from runtime.numerics import full_fp32

ROOT = Path(__file__).resolve().parents[1]
# The builds here gate on one small calibration sample: the gate's samples are not in the check
# set's key nor what it stores, and the default four 32x32 ones took most of each build's time.
ONE_SAMPLE = dict(size=1, side=8)


def _check(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runtime.check", str(folder), "--backend", "onnxruntime", "--device", "cpu", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "artifacts"
    shutil.copytree(folder, copy)
    return copy


def _set_check_set_sha(folder: Path) -> None:
    """Make the manifest accept the (altered) check-set file, as a careless hand edit would."""
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["check_set"]["sha256"] = sha256_file(folder / data["check_set"]["file"])
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2))


def test_build_stores_inputs_inside_the_first_profile_and_fp32_eager_outputs(small_artifacts, small_models):
    manifest = load_manifest(small_artifacts)
    record = manifest.check_set
    assert record is not None and record.file.startswith("checks/") and record.key in record.file
    assert sha256_file(small_artifacts / record.file) == record.sha256
    assert set(record.components) == {"cond_encoder", "unet", "vae_decoder"}
    tensors = load_file(str(small_artifacts / record.file))
    for name, entry in record.components.items():
        first = manifest.components[name].profiles[0]
        shapes = {n: tuple(tensors[f"{name}/inputs/{n}"].shape) for n in entry["inputs"]}
        assert first.covers(shapes), (name, shapes)
        assert all(s[0] == 1 for s in shapes.values())  # batch 1
    # the smallest side of the range (64 px: 8 latent pixels in, 16 out of a pass)
    assert tensors["cond_encoder/inputs/latents_small"].shape == (1, 32, 8, 8)
    assert tensors["unet/inputs/sample"].shape == (1, 32, 16, 16)
    assert tensors["vae_decoder/inputs/latents"].shape == (1, 32, 8, 8)
    # inputs in the types the fp16 graphs take; the encoder's outputs feed the U-Net in fp16
    assert tensors["unet/inputs/lr1"].dtype == torch.float16 and tensors["unet/inputs/sample"].dtype == torch.float32

    unet = small_models.unet
    names, seed = record.whole_pass["tensors"], record.whole_pass["seed"]
    latents_small = tensors[names["latents_small"]]
    with torch.inference_mode(), full_fp32():
        encoded = ConditioningEncoder(unet)(latents_small, torch.full((1,), 1000.0))
        x0 = reference_upscale(unet, latents_small, scale=2, seed=seed)
        noise = torch.randn((1, 32, 16, 16), generator=torch.Generator().manual_seed(seed))  # the CPU convention
        velocity = UNetBody(unet)(noise, *encoded)
    # the pass's steps are the components' entries: the encoder on the pass input, the U-Net on its noise
    assert torch.equal(tensors["cond_encoder/inputs/latents_small"], latents_small)
    assert names == {"latents_small": "cond_encoder/inputs/latents_small", "noise": "unet/inputs/sample",
                     "x0": "pass/x0"}
    assert torch.equal(tensors["unet/inputs/sample"], noise)
    for name, value in zip(("cond", "lr1", "lr2", "lr3"), encoded):
        torch.testing.assert_close(tensors[f"cond_encoder/outputs/{name}"], value, rtol=1e-6, atol=1e-6)
        assert tensors[f"cond_encoder/outputs/{name}"].dtype == torch.float32
        torch.testing.assert_close(tensors[f"unet/inputs/{name}"], value.half(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(tensors["unet/outputs/velocity"], velocity, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tensors["pass/x0"], x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0, noise - velocity, rtol=1e-6, atol=1e-6)  # x0 = noise - v


def test_limits_are_the_validation_tolerances_and_the_gate_thresholds(small_artifacts):
    record = read_manifest(small_artifacts).check_set
    tensors = load_file(str(small_artifacts / record.file))
    unet = record.components["unet"]["limits"]["velocity"]
    largest = float(tensors["unet/outputs/velocity"].abs().max())
    assert unet["rel_l2"] == 1e-2 and unet["max_abs"] == pytest.approx(5e-2 * max(1.0, largest))  # fp16 graph
    assert record.components["vae_decoder"]["limits"]["image"]["rel_l2"] == 1e-4  # fp32 graph
    assert record.whole_pass["precision"] == "fp16" and record.whole_pass["limits"] == {"rel_l2": 5e-3, "max_abs": 5e-2}


def test_limits_of_the_other_float_precisions_are_stored_beside(small_artifacts):
    record = read_manifest(small_artifacts).check_set
    tensors = load_file(str(small_artifacts / record.file))
    unet = record.components["unet"]["precision_limits"]
    largest = float(tensors["unet/outputs/velocity"].abs().max())
    assert set(unet) == {"bf16", "cpu-int8"} and unet["bf16"]["velocity"] == {"rel_l2": 5e-2, "max_abs": pytest.approx(
        0.25 * max(1.0, largest))}  # bf16's validation tolerance, for the fp16 graph run in bf16
    assert unet["cpu-int8"]["velocity"]["rel_l2"] == 0.15  # the int8 components' (the CPU graphs)
    assert set(record.components["vae_decoder"]["precision_limits"]) == {"fp16", "bf16"}  # an fp32 graph, no CPU graph
    assert record.whole_pass["precision_limits"] == {  # bf16's gate, also the CPU graphs' pass limits
        "bf16": {"rel_l2": 3e-2, "max_abs": 0.25}, "cpu-int8": {"rel_l2": 3e-2, "max_abs": 0.25}}


def test_the_torch_backend_in_bf16_is_held_to_bf16_limits(small_artifacts):
    """What auto runs on a CPU with bf16 units, checked against the limits of the precision it runs
    (it exceeds the fp16 graph's own on the full-size model); a check set without them says so."""
    with Upscaler.load(small_artifacts, backend="torch", precision="bf16", device="cpu") as upscaler:
        manifest = upscaler.manifest
        result = run_check_set(upscaler.backend, small_artifacts, manifest)
        precisions = {(o.component, o.output): (o.precision, o.limits["rel_l2"]) for o in result.outputs}
        assert precisions[("unet", "velocity")] == ("bf16", 5e-2) and precisions[("pass", "x0")] == ("bf16", 3e-2)
        assert precisions[("vae_decoder", "image")] == ("bf16", 5e-2) and result.passed and not result.notes
        for entry in (*manifest.check_set.components.values(), manifest.check_set.whole_pass):
            entry.pop("precision_limits")  # a check set built before they were stored
        older = run_check_set(upscaler.backend, small_artifacts, manifest)
    assert {(o.component, o.precision) for o in older.outputs if o.output in ("velocity", "x0")} == {
        ("unet", "fp16"), ("pass", "fp16")}
    assert len(older.notes) == 4 and "runs in bf16 here; the check set holds no bf16 limits (built before" in older.notes[0]


def test_runtime_check_passes_on_onnxruntime_cpu(small_artifacts):
    done = _check(small_artifacts)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for component, output in [("cond_encoder", "lr1"), ("unet", "velocity"), ("vae_decoder", "image"), ("pass", "x0")]:
        row = next(line for line in lines if line.split()[:1] == [component] and output in line.split())
        assert "rel-L2" in row and "max-abs" in row and row.endswith("PASS"), row
    assert lines[-1].startswith("PASS: 7 outputs")


def test_altered_expected_outputs_fail_naming_the_component(small_artifacts, tmp_path):
    folder = _copy(small_artifacts, tmp_path)
    path = folder / read_manifest(folder).check_set.file
    tensors = load_file(str(path))
    tensors["unet/outputs/velocity"] = tensors["unet/outputs/velocity"] * 1.1  # 10 % off: rel-L2 about 0.09
    save_file(tensors, str(path))
    _set_check_set_sha(folder)
    done = _check(folder)
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if line.endswith("FAIL")]
    assert len(failed) == 1 and failed[0].split()[:3] == ["unet", "fp16", "velocity"], done.stdout
    assert done.stdout.splitlines()[-1].startswith("FAIL: unet velocity (rel-L2 0.09")


def test_a_check_set_changed_behind_the_manifest_is_refused(small_artifacts, tmp_path):
    folder = _copy(small_artifacts, tmp_path)
    path = folder / read_manifest(folder).check_set.file
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    done = _check(folder)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().startswith("error: the check set checks/") and "does not match the manifest" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_folder_without_a_check_set_still_loads_and_check_says_why_not(small_artifacts, tmp_path):
    folder = _copy(small_artifacts, tmp_path)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    del data["check_set"]  # as written before check sets existed
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    assert load_manifest(folder).check_set is None
    done = _check(folder)
    assert done.returncode == 1 and "has no check set" in done.stderr and "rebuild with: " in done.stderr


def test_cannot_run_here_is_exit_1_with_why(small_artifacts, tmp_path):
    done = subprocess.run([sys.executable, "-m", "runtime.check", str(small_artifacts), "--backend", "tensorrt",
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")


def test_fp32_graphs_get_fp32_limits_and_pass(small_models, tmp_path):
    """fp32 graphs take the encoder's outputs in fp32: the same values under two names in the file."""
    random = {"source": "random", "seed": 0}
    settings = BuildSettings(target=PRESETS["rtx4090"].with_range(64, 128), precision="fp32", vae_precision="fp32",
                             components=("cond_encoder", "unet"), weights={"unet": random}, engine_flavour="tensorrt",
                             calibration=load_calibration_set(**ONE_SAMPLE))
    record = build_artifacts(small_models, settings, tmp_path / "fp32", log=lambda line: None).check_set
    assert record.components["unet"]["limits"]["velocity"]["rel_l2"] == 1e-4
    assert record.whole_pass["limits"] == {"rel_l2": 1e-4, "max_abs": 1e-3}
    tensors = load_file(str(tmp_path / "fp32" / record.file))
    assert torch.equal(tensors["unet/inputs/lr1"], tensors["cond_encoder/outputs/lr1"])
    done = _check(tmp_path / "fp32")
    assert done.returncode == 0, done.stdout + done.stderr


def _small_settings(seed: int = 0) -> BuildSettings:
    """The settings of the ``small_artifacts`` fixture (tests/conftest.py), but for the gate's calibration."""
    random = {"source": "random", "seed": 0}
    return BuildSettings(target=PRESETS["rtx4090"].with_range(64, 512), precision="fp16", vae_precision="fp32",
                         weights={"unet": random, "vae": random}, seed=seed,
                         calibration=load_calibration_set(**ONE_SAMPLE))


def test_a_rerun_reuses_the_check_set_and_a_new_one_replaces_the_old(small_artifacts, small_models, tmp_path):
    folder = _copy(small_artifacts, tmp_path)
    before = read_manifest(folder).check_set
    log: list[str] = []
    again = build_artifacts(small_models, _small_settings(), folder, log=log.append).check_set
    assert (again.file, again.sha256) == (before.file, before.sha256)
    assert "  check set: reused (unchanged inputs)" in log
    report = json.loads((folder / "report.json").read_text())
    assert {s["stage"]: s["reused"] for s in report["stages"]}["check set"] is True

    changed = build_artifacts(small_models, _small_settings(seed=1), folder, log=lambda line: None).check_set
    assert changed.file != before.file and changed.whole_pass["seed"] == 1
    assert sorted(p.name for p in (folder / "checks").iterdir()) == [Path(changed.file).name]  # the old one deleted


def test_leftovers_of_a_killed_build_in_checks_are_deleted(small_artifacts, tmp_path):
    folder = _copy(small_artifacts, tmp_path)
    named = folder / read_manifest(folder).check_set.file
    stray = [folder / "checks" / "checkset.0123456789abcdef.safetensors", folder / "checks" / "x.safetensors.partial"]
    user_file = folder / "checks" / "notes.txt"  # not a kind of file the build writes: left alone
    user_file.write_text("mine")
    users_own = folder / "checks" / "mine.safetensors"  # named like the build's, there before it: kept
    users_own.write_bytes(b"the user's")
    ArtifactFolder(folder).begin()  # what a build records under its lock before any stage writes
    for path in stray:  # then it is killed after writing these
        path.write_bytes(b"left by a killed build")
    ArtifactFolder(folder).clean_leftovers()  # the next build
    assert named.is_file() and user_file.is_file() and users_own.is_file() and not any(p.exists() for p in stray)
