"""TensorRT-RTX engines, built for real on this machine (no GPU needed to build them).

Every component in every precision the RTX presets allow is built for compute capability 12.0
(rtx5090) and 8.6 (rtx3090) from the small models' graphs; whole builds check the manifest against
the files, reuse and rebuilds, the engine-memory budget and the command line. Running an engine
needs an RTX-class GPU: ``tests/test_tensorrt_rtx_gpu.py``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch

from calib.data import load_calibration_set
from calib.quantize import FLOAT_PART, calibration_inputs, quantize_graph
from engines.flavours import TENSORRT
from engines.manifest import ManifestError, load_manifest
from engines.profiles import Profile, ProfileError, check_engine_memory
from engines.targets import PRESETS
from engines.tensorrt_build import BuildOptions
from engines.tensorrt_rtx_build import build_rtx_engine
from export.build import main as build_main
from export.checkpoint import random_vae, seeded_init
from export.models import UpscalerUNet
from export.onnx.components import COMPONENTS, Models
from export.onnx.exporter import export_component
from export.pipeline.driver import build_artifacts
from export.pipeline.quantize import eager_encode
from export.pipeline.settings import BuildSettings
from runtime import Upscaler
from runtime.backends import BackendUnavailable

from .conftest import SMALL_UNET, SMALL_VAE
from .cpu_units import WITHOUT_BF16, pretend_cpu

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install -e '.[rtx]')")

FLOAT = ("fp16", "bf16")
QUANTIZED = ("int8", "fp8")
VAE_PRECISIONS = ("fp32", "fp16", "bf16")
# Main-input sides of the one or two profiles each component gets here: small and quick to build.
SIDES = {"cond_encoder": (8, 16), "unet": (16, 32), "vae_decoder": (16,)}


def _models(seed: int = 0) -> Models:
    unet = seeded_init(lambda: UpscalerUNet(**SMALL_UNET), seed).eval()
    return Models(unet=unet, vae=random_vae(0, **SMALL_VAE))


def _profiles(component: str, models: Models) -> list[Profile]:
    shapes = COMPONENTS[component].input_shapes
    lo, *_ = SIDES[component]
    return [Profile(f"{component}:{side}", shapes(models, 1, lo, lo), shapes(models, 1, side, side),
                    shapes(models, 2, side, side)) for side in SIDES[component]]


@pytest.fixture(scope="module")
def rtx5090_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """A whole rtx5090 build of the small models in bf16 (the VAE too)."""
    out = tmp_path_factory.mktemp("rtx5090")
    log: list[str] = []
    build_artifacts(_models(), _settings("rtx5090"), out, log=log.append)
    return out, log


@pytest.fixture(scope="module")
def graphs(small_artifacts, rtx5090_folder, tmp_path_factory) -> tuple[Models, dict[tuple[str, str], Path]]:
    """Every (component, precision) graph of the small models: the float graphs the two folders
    hold (fp16 with an fp32 VAE, bf16), the rest exported here; int8 Q/DQ from fp16 graphs and fp8
    from fp32 ones, as the build makes them (calib.quantize.FLOAT_PART)."""
    out = tmp_path_factory.mktemp("rtx_graphs")
    models = _models()
    made = {}
    for folder in (small_artifacts, rtx5090_folder[0]):
        for name, record in load_manifest(folder).components.items():
            made[name, record.precision] = folder / record.onnx_file
    for component, precision in (("vae_decoder", "fp16"), ("cond_encoder", "fp32"), ("unet", "fp32")):
        made[component, precision] = export_component(
            COMPONENTS[component], models, precision, out / f"{component}.{precision}.onnx").path
    calibration = load_calibration_set(size=1, side=16)
    for component in ("cond_encoder", "unet"):
        feeds = calibration_inputs(component, eager_encode(models), calibration)
        for precision in QUANTIZED:
            made[component, precision] = quantize_graph(
                made[component, FLOAT_PART[precision]], out / f"{component}.{precision}.onnx", component, precision,
                feeds).path
    return models, made


def _cases(target: str) -> list[tuple[str, str]]:
    allowed = PRESETS[target].precisions
    unet = [(c, p) for c in ("cond_encoder", "unet") for p in (*FLOAT, *QUANTIZED) if p in allowed]
    return unet + [("vae_decoder", p) for p in VAE_PRECISIONS if p == "fp32" or p in allowed]


@pytest.mark.parametrize("target, component, precision",
                         [(t, c, p) for t in ("rtx5090", "rtx3090") for c, p in _cases(t)])
def test_every_component_and_precision_builds_for_the_rtx_targets(graphs, tmp_path, target, component, precision):
    models, made = graphs
    profiles = _profiles(component, models)
    engine = tmp_path / "engine.plan"
    lines = []
    facts = build_rtx_engine(component, made[component, precision], profiles, PRESETS[target].compute_capability,
                             BuildOptions(), engine, report=lines.append)
    assert engine.is_file() and engine.stat().st_size == facts["engine_bytes"] > 100_000
    assert not list(tmp_path.glob("*.partial"))
    assert len(facts["activation_bytes_per_profile"]) == len(profiles)
    assert all(b > 0 for b in facts["activation_bytes_per_profile"])
    if len(profiles) == 2:  # the larger profile needs more
        assert facts["activation_bytes_per_profile"][1] > facts["activation_bytes_per_profile"][0]
    assert 0 < facts["weights_bytes"] <= facts["engine_bytes"]
    assert facts["tf32"] is False and any("Building engine" in line for line in lines)


def test_ctrl_c_during_a_build_cancels_it_and_writes_nothing(graphs, tmp_path):
    """SIGINT arriving while TensorRT-RTX builds runs Python's handler inside a builder callback,
    where the bindings swallow the KeyboardInterrupt: the build has to be cancelled instead."""
    import os
    import signal

    models, made = graphs

    def ctrl_c(line: str) -> None:  # the first progress line: the build is under way
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        build_rtx_engine("unet", made["unet", "fp16"], _profiles("unet", models), (12, 0), BuildOptions(),
                         tmp_path / "engine.plan", report=ctrl_c)
    assert not list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGINT) is previous


def test_the_rtx_presets_take_exactly_the_precisions_their_compute_capability_has():
    assert _cases("rtx5090") == [
        ("cond_encoder", "fp16"), ("cond_encoder", "bf16"), ("cond_encoder", "int8"), ("cond_encoder", "fp8"),
        ("unet", "fp16"), ("unet", "bf16"), ("unet", "int8"), ("unet", "fp8"),
        ("vae_decoder", "fp32"), ("vae_decoder", "fp16"), ("vae_decoder", "bf16"),
    ]
    assert ("unet", "fp8") not in _cases("rtx3090") and ("unet", "bf16") in _cases("rtx3090")


def test_a_compute_capability_tensorrt_rtx_lacks_is_refused_before_building(graphs, tmp_path):
    models, made = graphs
    with pytest.raises(Exception, match=r"TensorRT-RTX cannot build for compute capability 9.0 \(it builds for 7.5"):
        build_rtx_engine("unet", made["unet", "fp16"], _profiles("unet", models), (9, 0), BuildOptions(),
                         tmp_path / "e.plan")
    assert not list(tmp_path.iterdir())


def _settings(target: str, **overrides) -> BuildSettings:
    random = {"source": "random", "seed": 0}
    settings = dict(target=PRESETS[target].with_range(64, 256), precision="bf16", vae_precision="bf16",
                    weights={"unet": random, "vae": random})
    return BuildSettings(**{**settings, **overrides})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_records_each_engine_as_its_file_says(rtx5090_folder):
    out, _ = rtx5090_folder
    manifest = load_manifest(out, engines=True, flavour="tensorrt-rtx", tensorrt_version=trt.__version__,
                             compute_capability=(12, 0))
    assert set(manifest.components) == {"cond_encoder", "unet", "vae_decoder"}
    for name, record in manifest.components.items():
        engine, path = record.engine, out / record.engine.file
        assert engine.built and engine.flavour == "tensorrt-rtx" and engine.tensorrt_version == trt.__version__
        assert engine.compute_capability == "12.0" and engine.gpu == "NVIDIA GeForce RTX 5090"
        assert engine.sha256 == _sha256(path) and engine.facts["engine_bytes"] == path.stat().st_size
        assert len(engine.facts["activation_bytes_per_profile"]) == len(record.profiles) >= 1
        assert engine.facts["weights_bytes"] > 0 and engine.facts["tf32"] is False
        assert f".{record.precision}.sm120.tensorrt-rtx{trt.__version__}." in engine.file
    assert manifest.components["vae_decoder"].precision == "bf16"
    assert manifest.target["engine_flavours"] == ["tensorrt-rtx", "tensorrt"]


def test_the_runtime_refuses_the_folder_for_another_gpu_or_flavour(rtx5090_folder):
    out, _ = rtx5090_folder
    with pytest.raises(ManifestError, match=r"compute capability 12.0 \(NVIDIA GeForce RTX 5090\) at build, 8.6 here"):
        load_manifest(out, engines=True, flavour="tensorrt-rtx", tensorrt_version=trt.__version__,
                      compute_capability=(8, 6))
    with pytest.raises(ManifestError, match=r"TensorRT-RTX 1\.7\.1\.116 at build, 1\.8\.0 here. Rebuild"):
        load_manifest(out, engines=True, flavour="tensorrt-rtx", tensorrt_version="1.8.0", compute_capability=(12, 0))
    with pytest.raises(ManifestError, match="TensorRT-RTX engines, asked to run on TensorRT"):
        load_manifest(out, engines=True, flavour="tensorrt", tensorrt_version="10.16.1.11", compute_capability=(12, 0))


def test_without_a_gpu_the_tensorrt_backend_refuses_in_one_line_and_auto_says_why(rtx5090_folder, monkeypatch):
    out, _ = rtx5090_folder
    with pytest.raises(BackendUnavailable) as refused:
        Upscaler.load(out, backend="tensorrt", device="cpu")
    assert str(refused.value) == "TensorRT-RTX needs a CUDA GPU, and this machine has none (cpu asked)"
    if torch.cuda.is_available():
        pytest.skip("auto's choice on a GPU machine is a GPU test")
    pretend_cpu(monkeypatch, WITHOUT_BF16)  # the CPU's fp32 path: onnxruntime first
    with Upscaler.load(out) as up:  # bf16 graphs: ONNX Runtime's CPU provider refuses them too, torch runs
        assert up.backend_name == "torch" and list(up.skipped_backends) == ["tensorrt", "onnxruntime"]
        assert "the folder's engines need a CUDA GPU" in up.skipped_backends["tensorrt"]


def test_a_rerun_reuses_every_engine_and_a_changed_graph_rebuilds_its_own(rtx5090_folder, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(rtx5090_folder[0], out)
    before = load_manifest(out)
    log: list[str] = []
    build_artifacts(_models(), _settings("rtx5090"), out, log=log.append)
    assert sum("engine: reused" in line for line in log) == 3 and not any("building the" in line for line in log)
    assert {n: c.engine.sha256 for n, c in load_manifest(out).components.items()} == {
        n: c.engine.sha256 for n, c in before.components.items()}

    log.clear()
    build_artifacts(_models(seed=1), _settings("rtx5090"), out, log=log.append)  # new U-Net weights, same VAE
    after = load_manifest(out)
    for name in ("cond_encoder", "unet"):
        assert after.components[name].engine.key != before.components[name].engine.key
        assert after.components[name].engine.sha256 == _sha256(out / after.components[name].engine.file)
        assert not (out / before.components[name].engine.file).exists()  # the old engine went with its manifest
    assert after.components["vae_decoder"].engine == before.components["vae_decoder"].engine
    assert sum("engine: reused" in line for line in log) == 1


def test_rtx3090_engines_over_an_rtx4090_folder_reuse_its_graphs(small_artifacts, small_models, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(small_artifacts, out)
    settings = BuildSettings(target=PRESETS["rtx3090"].with_range(64, 512), precision="fp16", vae_precision="fp32",
                             weights=load_manifest(small_artifacts).weights,
                             calibration=load_calibration_set(size=1, side=8))  # the gate's samples: not checked here
    log: list[str] = []
    build_artifacts(small_models, settings, out, log=log.append)
    assert sum("onnx: reused" in line for line in log) == 3
    manifest = load_manifest(out, engines=True, flavour="tensorrt-rtx", tensorrt_version=trt.__version__,
                             compute_capability=(8, 6))
    assert {c.engine.compute_capability for c in manifest.components.values()} == {"8.6"}
    assert all(".sm86." in c.engine.file and (out / c.engine.file).is_file() for c in manifest.components.values())
    assert not list((out / "engines").glob("*.sm89.*"))  # the 8.9 engines went with the old manifest


def test_the_engine_memory_check_refuses_a_profile_over_the_budget(rtx5090_folder):
    out, _ = rtx5090_folder
    record = load_manifest(out).components["unet"]
    facts, gib = record.engine.facts, 2**30
    activations, weights = facts["activation_bytes_per_profile"], facts["weights_bytes"]
    budget = max(activations) + weights - 1  # the largest profile misses by a byte
    largest = record.profiles[activations.index(max(activations))]
    with pytest.raises(ProfileError) as refused:
        check_engine_memory("unet", record.profiles, activations, weights, budget, record.memory_estimate_bytes)
    message = str(refused.value)
    assert f"profile {largest.name} needs {(max(activations) + weights) / gib:.2f} GiB" in message
    assert f"over the memory budget of {budget / gib:.2f} GiB" in message and "ONNX estimate" in message
    check_engine_memory("unet", record.profiles, activations, weights, budget + 1)  # fits exactly


def test_an_engine_over_the_budget_is_refused_before_the_manifest(rtx5090_folder, tmp_path, monkeypatch):
    """The stage applies the check: a build whose engine reports more than the budget publishes nothing."""
    from export.pipeline import engine as engine_stage

    def tiny_budget(component, profiles, activations, weights, budget, estimates=None):
        check_engine_memory(component, profiles, activations, weights, 1, estimates)

    monkeypatch.setattr(engine_stage, "check_engine_memory", tiny_budget)
    out = tmp_path / "art"
    shutil.copytree(rtx5090_folder[0], out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(Exception, match=r"the cond_encoder engine's profile cond_encoder:\d+ needs"):
        build_artifacts(_models(seed=1), _settings("rtx5090"), out, log=lambda line: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.fixture(scope="module")
def main_build(tmp_path_factory) -> tuple[Path, str]:
    """The main command for the full-size encoder (its ONNX export takes seconds), as a user runs it."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("main") / "art"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = build_main(["--target", "rtx5090", "--random-weights", "--components", "cond_encoder",
                           "--min-px", "512", "--max-px", "1024", "--out", str(out)])
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()


def test_main_command_without_a_gpu_ends_with_engines_built(main_build):
    out, printed = main_build
    assert f"engines: TensorRT-RTX {trt.__version__}" in printed and "engines not built" not in printed
    record = load_manifest(out).components["cond_encoder"].engine
    assert record.built and f"{record.file}: " in printed and "cond_encoder:64 " in printed
    assert "python -m runtime.check" in printed


def test_a_profile_too_large_for_static_allocation_reports_its_real_memory(main_build, tmp_path):
    """Without REQUIRE_USER_ALLOCATION the builder falls back to run-time allocation for huge
    profiles and reports a few MB; the engine would allocate outside the runtime's scratch."""
    out, _ = main_build
    record = load_manifest(out).components["cond_encoder"]
    side = 4096
    shapes = {"latents_small": (1, 32, side, side), "timestep": (1,)}
    huge = Profile("cond_encoder:4096", record.profiles[0].min, shapes, shapes)
    facts = build_rtx_engine("cond_encoder", out / record.onnx_file, [huge], (12, 0), BuildOptions(),
                             tmp_path / "huge.plan", report=lambda line: None)
    one_feature_map = 384 * side * side * 2  # the encoder's 384-channel fp16 map at the input size
    assert facts["activation_bytes_per_profile"][0] >= one_feature_map


@pytest.mark.parametrize("argv, message", [
    (["--target", "h100", "--engine-flavour", "tensorrt-rtx"],
     "tensorrt-rtx engines cannot target NVIDIA H100 SXM (compute capability 9.0): use tensorrt"),
    (["--target", "rtx3090", "--precision", "fp8"], "fp8 needs compute capability >= 8.9"),
])
def test_requests_outside_what_the_target_takes_are_refused_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        build_main([*argv, "--random-weights", "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_datacenter_target_without_tensorrt_still_finishes_with_the_reason(tmp_path, capsys):
    if TENSORRT.version() is not None:
        pytest.skip("TensorRT 10/11 is installed here: this checks a machine without it")
    assert PRESETS["h100"].engine_flavours == ("tensorrt",)
    out = tmp_path / "art"
    code = build_main(["--target", "h100", "--random-weights", "--components", "cond_encoder",
                       "--min-px", "512", "--max-px", "1024", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    record = load_manifest(out).components["cond_encoder"].engine
    assert not record.built and "TensorRT is not installed" in record.reason
    assert "engines not built (TensorRT is not installed" in printed


def _tiny_graph(path: Path, width: int = 4) -> Path:
    """A one-operation graph, y = 2x for x of shape [1, width]: its one weight tensor is width floats."""
    import onnx
    from onnx import TensorProto, helper

    two = helper.make_tensor("two", TensorProto.FLOAT, [width], [2.0] * width)
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], [two])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _tiny_build(folder: Path, width: int = 4, num_profiles: int = 1) -> tuple[Path, dict]:
    """A tiny engine built for real, for checks that need a plan or a build but not the models."""
    graph = _tiny_graph(folder / f"tiny{width}.onnx", width)
    shape = {"x": (1, width)}
    engine = folder / f"tiny{width}.plan"
    facts = build_rtx_engine("tiny", graph, [Profile(f"tiny:{i}", shape, shape, shape) for i in range(num_profiles)],
                             (12, 0), BuildOptions(), engine, report=lambda line: None)
    return engine, facts


def test_builds_beside_a_runtime_with_its_own_logger_and_beside_each_other_keep_their_memory_figures(tmp_path):
    """TensorRT keeps one logger per process (it says it ignores another given later): a build must
    get its own figures with a runtime made first on a logger of its own, and with a second build
    running at the same time in another thread."""
    import threading

    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))  # first in this test; alive through the builds
    start, built = threading.Barrier(2), {}

    def build(width: int, num_profiles: int) -> None:
        start.wait()
        try:
            built[width] = _tiny_build(tmp_path, width, num_profiles)[1]
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            built[width] = exc

    threads = [threading.Thread(target=build, args=(4, 1)), threading.Thread(target=build, args=(256, 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runtime.engine_header_size > 0
    for width, num_profiles in ((4, 1), (256, 2)):
        facts = built[width]
        assert isinstance(facts, dict), facts
        assert len(facts["activation_bytes_per_profile"]) == num_profiles
        assert facts["weights_bytes"] == 4 * width  # its one fp32 weight tensor, not the other build's


def test_an_engine_tensorrt_rtx_cannot_check_for_want_of_a_driver_says_check_the_driver(tmp_path):
    """Without a usable driver TensorRT-RTX still makes a runtime, logs cudaError 35 and calls every
    engine invalid with no diagnostic bit: the refusal must point at the driver, not at a rebuild."""
    from runtime import BackendUnavailable as Unavailable
    from runtime.backends.tensorrt_rtx import plan_problem

    if torch.cuda.is_available():
        pytest.skip("this machine has a working CUDA driver: TensorRT-RTX can check the engine here")
    plan = _tiny_build(tmp_path)[0].read_bytes()
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    assert runtime.get_engine_validity(plan[:runtime.engine_header_size]) == (trt.EngineValidity.INVALID, 0)
    with pytest.raises(Unavailable) as refused:
        plan_problem(trt, runtime, plan)
    message = str(refused.value)
    assert "check that the NVIDIA driver is installed" in message and re.search(r"\(tensorrt_rtx_cu\d+\)", message)
    assert "rebuilding the folder does not help" in message and "\n" not in message
