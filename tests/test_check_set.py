"""The check set: what the build stores (the smallest and largest shape of every profile, within its
budget), ``python -m runtime.check`` on ONNX Runtime's CPU provider (which shows the check set itself
is right), a check set altered on purpose or of another layout, and reuse."""

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
from export.models import ConditioningEncoder, UNetBody, VAEDecoder
from export.onnx.components import COMPONENTS
from export.pipeline.checkset import MakeCheckSet
from export.pipeline.folder import ArtifactFolder
from export.pipeline.progress import StageLog
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


def _case_shapes(tensors: dict[str, torch.Tensor], component: str, inputs: list[str]) -> dict[str, dict]:
    """Every stored case of ``component`` in the file: its name -> each input's shape (from the tensors)."""
    names = {key.split("/")[1] for key in tensors if key.startswith(f"{component}/")}
    return {case: {n: tuple(tensors[f"{component}/{case}/inputs/{n}"].shape) for n in inputs} for case in names}


def test_the_check_set_holds_the_smallest_and_largest_shape_of_every_profile_of_every_component(
        small_artifacts, small_models):
    """Against the manifest's profiles and the file's own tensors (not the record's case list)."""
    manifest = load_manifest(small_artifacts)
    record = manifest.check_set
    assert record.version == 2 and record.facts["budget_bytes"] == 192 * 2**20
    assert record.facts["bytes"] == (small_artifacts / record.file).stat().st_size <= record.facts["budget_bytes"]
    tensors = load_file(str(small_artifacts / record.file))
    assert {key.split("/")[0] for key in tensors} == {"cond_encoder", "unet", "vae_decoder", "pass"}
    for name, component in manifest.components.items():
        stored = _case_shapes(tensors, name, component.inputs)
        assert len(component.profiles) == (3 if name != "vae_decoder" else 1)
        for profile in component.profiles:
            for end in (profile.min, profile.max):
                matching = [c for c, shapes in stored.items() if shapes == {n: tuple(end[n]) for n in component.inputs}]
                assert len(matching) == 1, (name, profile.name, end, sorted(stored))
                for output in component.outputs:
                    assert tensors[f"{name}/{matching[0]}/outputs/{output}"].dtype == torch.float32
        assert not record.components[name]["not_stored"]  # the small build fits the budget whole
        assert all("reduced" not in case for case in record.components[name]["cases"])
    # the profiles' largest batch is in the file: 4 at every side of the U-Net's range
    unet = _case_shapes(tensors, "unet", ["sample"])
    assert sorted(s["sample"] for s in unet.values()) == [(1, 32, 16, 16), (4, 32, 16, 16), (4, 32, 32, 32),
                                                          (4, 32, 64, 64)]
    # the largest decoder and U-Net cases' expected outputs are the fp32 eager ones
    decoder = next(c for c, s in _case_shapes(tensors, "vae_decoder", ["latents"]).items() if s["latents"][0] == 4)
    unet_largest = next(c for c, s in unet.items() if s["sample"] == (4, 32, 64, 64))
    with torch.inference_mode(), full_fp32():
        image = VAEDecoder(small_models.vae)(tensors[f"vae_decoder/{decoder}/inputs/latents"])
        velocity = UNetBody(small_models.unet)(*(tensors[f"unet/{unet_largest}/inputs/{n}"].float()
                                                 for n in ("sample", "cond", "lr1", "lr2", "lr3")))
    assert image.shape == (4, 3, 512, 512)
    torch.testing.assert_close(tensors[f"vae_decoder/{decoder}/outputs/image"], image, rtol=1e-5, atol=1e-5)
    # stored lr maps are the fp16 rounding of the encoder's: the eager U-Net on them is close, not equal
    torch.testing.assert_close(tensors[f"unet/{unet_largest}/outputs/velocity"], velocity, rtol=2e-2, atol=2e-2)


def test_the_pass_and_its_steps_are_fp32_eager_at_the_smallest_shape(small_artifacts, small_models):
    manifest = load_manifest(small_artifacts)
    record = manifest.check_set
    tensors = load_file(str(small_artifacts / record.file))
    encoder = next(c for c, s in _case_shapes(tensors, "cond_encoder", ["latents_small"]).items()
                   if s["latents_small"] == (1, 32, 8, 8))  # the smallest side of the range (64 px)
    unet = next(c for c, s in _case_shapes(tensors, "unet", ["sample"]).items() if s["sample"] == (1, 32, 16, 16))
    # inputs in the types the fp16 graphs take; the encoder's outputs feed the U-Net in fp16
    assert tensors[f"unet/{unet}/inputs/lr1"].dtype == torch.float16
    assert tensors[f"unet/{unet}/inputs/sample"].dtype == torch.float32

    names, seed = record.whole_pass["tensors"], record.whole_pass["seed"]
    latents_small = tensors[names["latents_small"]]
    with torch.inference_mode(), full_fp32():
        encoded = ConditioningEncoder(small_models.unet)(latents_small, torch.full((1,), 1000.0))
        x0 = reference_upscale(small_models.unet, latents_small, scale=2, seed=seed)
        noise = torch.randn((1, 32, 16, 16), generator=torch.Generator().manual_seed(seed))  # the CPU convention
        velocity = UNetBody(small_models.unet)(noise, *encoded)
    # the pass's steps are the components' smallest cases: the encoder on the pass input, the U-Net on its noise
    assert names == {"latents_small": f"cond_encoder/{encoder}/inputs/latents_small",
                     "noise": f"unet/{unet}/inputs/sample", "x0": "pass/x0"}
    assert torch.equal(tensors[names["noise"]], noise)
    for name, value in zip(("cond", "lr1", "lr2", "lr3"), encoded):
        torch.testing.assert_close(tensors[f"cond_encoder/{encoder}/outputs/{name}"], value, rtol=1e-6, atol=1e-6)
        assert tensors[f"cond_encoder/{encoder}/outputs/{name}"].dtype == torch.float32
        torch.testing.assert_close(tensors[f"unet/{unet}/inputs/{name}"], value.half(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(tensors[f"unet/{unet}/outputs/velocity"], velocity, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tensors["pass/x0"], x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0, noise - velocity, rtol=1e-6, atol=1e-6)  # x0 = noise - v


def _largest(tensors: dict[str, torch.Tensor], component: str, output: str) -> float:
    """The largest |value| of ``output`` over all of ``component``'s cases."""
    return max(float(t.abs().max()) for k, t in tensors.items()
               if k.startswith(f"{component}/") and k.endswith(f"/outputs/{output}"))


def test_limits_are_the_validation_tolerances_and_the_gate_thresholds(small_artifacts):
    record = read_manifest(small_artifacts).check_set
    tensors = load_file(str(small_artifacts / record.file))
    unet = record.components["unet"]["limits"]["velocity"]
    largest = _largest(tensors, "unet", "velocity")  # one limit for all the U-Net's cases
    assert unet["rel_l2"] == 1e-2 and unet["max_abs"] == pytest.approx(5e-2 * max(1.0, largest))  # fp16 graph
    assert record.components["vae_decoder"]["limits"]["image"]["rel_l2"] == 1e-4  # fp32 graph
    assert record.whole_pass["precision"] == "fp16" and record.whole_pass["limits"] == {"rel_l2": 5e-3, "max_abs": 5e-2}


def test_limits_of_the_other_float_precisions_are_stored_beside(small_artifacts):
    record = read_manifest(small_artifacts).check_set
    tensors = load_file(str(small_artifacts / record.file))
    unet = record.components["unet"]["precision_limits"]
    largest = _largest(tensors, "unet", "velocity")
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
            entry["precision_limits"].pop("bf16")  # a check set without them
        without = run_check_set(upscaler.backend, small_artifacts, manifest)
    assert {(o.component, o.precision) for o in without.outputs if o.output in ("velocity", "x0")} == {
        ("unet", "fp16"), ("pass", "fp16")}
    assert len(without.notes) == 4
    assert "runs in bf16 here; the check set holds no bf16 limits for it" in without.notes[0]


def test_runtime_check_passes_on_onnxruntime_cpu(small_artifacts):
    done = _check(small_artifacts)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for component, output in [("cond_encoder", "lr1"), ("unet", "velocity"), ("vae_decoder", "image"), ("pass", "x0")]:
        rows = [line for line in lines if line.split()[:1] == [component] and output in line.split()]
        assert rows and all("rel-L2" in r and "max-abs" in r and r.endswith("PASS") for r in rows), rows
        assert all("3 calls" in r for r in rows) if component != "pass" else "1 call" in rows[0]
    # a row per case: the largest U-Net and decoder shapes of the manifest's profiles among them
    assert any("velocity" in line and "sample 4x32x64x64" in line for line in lines), done.stdout
    assert any("image" in line and "latents 4x32x64x64" in line for line in lines), done.stdout
    assert lines[-1].startswith("PASS: 23 outputs within their limits on every call")  # 4x4 + 4 + 2 + the pass


def test_altered_expected_outputs_fail_naming_the_component(small_artifacts, tmp_path):
    folder = _copy(small_artifacts, tmp_path)
    path = folder / read_manifest(folder).check_set.file
    tensors = load_file(str(path))
    largest = next(k for k, t in tensors.items() if k.startswith("unet/") and k.endswith("/inputs/sample")
                   and t.shape == (4, 32, 64, 64)).replace("/inputs/sample", "/outputs/velocity")
    tensors[largest] = tensors[largest] * 1.1  # 10 % off: rel-L2 about 0.09
    save_file(tensors, str(path))
    _set_check_set_sha(folder)
    done = _check(folder)
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if "FAIL on the" in line]
    assert len(failed) == 1, done.stdout
    assert failed[0].split()[:5] == ["unet", "fp16", "velocity", "sample", "4x32x64x64"], done.stdout
    assert failed[0].endswith("FAIL on the first call, second call, replayed call"), failed[0]
    assert done.stdout.splitlines()[-1].startswith("FAIL: unet velocity at sample 4x32x64x64, first call (rel-L2 0.09")


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


def test_a_check_set_of_another_layout_is_refused_saying_to_rebuild(small_artifacts, tmp_path):
    folder = _copy(small_artifacts, tmp_path)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["check_set"]["version"] = 1  # the layout that held the first profile's smallest shape only
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    done = _check(folder)
    assert done.returncode == 1 and done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert "has layout version 1; this runtime reads version 2" in done.stderr and "rebuild with: " in done.stderr


def _remake_check_set(folder: Path, small_models, budget: int) -> dict:
    """The check-set stage alone over ``folder``'s components with ``budget``, put in its manifest."""
    manifest = read_manifest(folder)
    stage = MakeCheckSet(small_models, _small_settings(), {"budget": str(budget)}, ArtifactFolder(folder),
                         StageLog(lambda line: None), budget=budget)
    record = stage(manifest.components)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["check_set"] = record.to_dict()
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    return data


def test_largest_shapes_over_the_budget_are_checked_at_the_largest_that_fits_and_said_so(
        small_artifacts, small_models, tmp_path):
    """12 MiB: the smallest shapes (about 2 MB here) and the largest of the encoder and the U-Net fit;
    the decoder's batch 4 at 64x64 (about 15 MB with its image) does not, and is checked smaller but
    still beyond its smallest shape; the file stays within the budget."""
    folder = _copy(small_artifacts, tmp_path)
    budget = 12 * 2**20
    data = _remake_check_set(folder, small_models, budget)
    record = data["check_set"]
    assert (folder / record["file"]).stat().st_size <= budget
    tensors = load_file(str(folder / record["file"]))
    tile = read_manifest(folder).components["vae_decoder"].profiles[0]
    decoder = _case_shapes(tensors, "vae_decoder", ["latents"])
    shapes = sorted(s["latents"] for s in decoder.values())
    assert len(shapes) == 2 and shapes[0] == tuple(tile.min["latents"]) and tuple(tile.max["latents"]) not in shapes
    assert tile.admits("latents", shapes[1]) and shapes[1] > shapes[0]
    reduced = [c for c in record["components"]["vae_decoder"]["cases"] if "reduced" in c]
    assert len(reduced) == 1 and reduced[0]["reduced"]["largest"] == list(tile.max["latents"])
    for name in ("cond_encoder", "unet"):  # these fit whole
        stored = [s for s in _case_shapes(tensors, name, [COMPONENTS[name].inputs[0]]).values()]
        for profile in read_manifest(folder).components[name].profiles:
            main = COMPONENTS[name].inputs[0]
            assert {main: tuple(profile.max[main])} in stored
    with Upscaler.load(folder, backend="onnxruntime", device="cpu") as upscaler:
        result = run_check_set(upscaler.backend, folder, upscaler.manifest)
    assert result.passed
    assert result.coverage == [f"vae_decoder {tile.name}: checked at latents {'x'.join(map(str, shapes[1]))}, smaller "
                               f"than its largest latents {'x'.join(map(str, tile.max['latents']))}, which does not "
                               "fit the check set's budget"]


def test_a_budget_of_the_tensors_bytes_alone_leaves_no_room_for_the_header(small_artifacts, small_models, tmp_path):
    """The whole file stays within the budget: a budget of exactly the bytes of every tensor the small
    build stores (all its largest shapes fit 192 MiB) cannot hold them all with the file's header."""
    folder = _copy(small_artifacts, tmp_path)
    tensors = load_file(str(folder / read_manifest(folder).check_set.file))
    budget = sum(t.numel() * t.element_size() for t in tensors.values())
    record = _remake_check_set(folder, small_models, budget)["check_set"]
    assert (folder / record["file"]).stat().st_size <= budget
    assert [c for entry in record["components"].values() for c in entry["cases"] if "reduced" in c]


def test_a_budget_the_smallest_shapes_fill_keeps_them_and_says_which_profiles_are_not_checked(
        small_artifacts, small_models, tmp_path):
    folder = _copy(small_artifacts, tmp_path)
    record = _remake_check_set(folder, small_models, budget=1)["check_set"]
    tensors = load_file(str(folder / record["file"]))
    manifest = read_manifest(folder)
    for name, component in manifest.components.items():
        main = component.inputs[0]
        stored = [s[main] for s in _case_shapes(tensors, name, [main]).values()]
        assert stored == [tuple(component.profiles[0].min[main])]
        assert set(record["components"][name]["not_stored"]) == {p.name for p in component.profiles}
    done = _check(folder)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "note: unet unet:64: largest shape not checked: even its smallest shape that runs on it" in done.stdout


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
    assert torch.equal(tensors["unet/b1.16x16/inputs/lr1"], tensors["cond_encoder/b1.8x8/outputs/lr1"])
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
