"""The CPU graphs (issue 24): int8 graphs of the pass for ONNX Runtime's CPU provider, made by the
build beside the folder's own, gated against fp32 eager at bf16's limits, and run by ``auto`` on
CPUs with int8 dot products, with decoding on the path that follows."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch

from calib import thresholds
from engines.manifest import MANIFEST_NAME, read_manifest, sha256_file
from export.build import main as build_main
from export.pipeline.driver import build_artifacts
from export.pipeline.errors import BuildError
from export.pipeline.settings import BuildSettings
from export.reference import upscale as reference_upscale
from engines.targets import PRESETS
from runtime import BackendUnavailable, ManifestError, Upscaler
from runtime.checkset import run_check_set
from runtime import InvalidArgumentError

from .cpu_units import WITH_BF16, WITHOUT_BF16, pretend_cpu

RANDOM = {"source": "random", "seed": 0}
WITH_BF16_AND_INT8 = replace(WITH_BF16, int8_dot=True)
INT8_ONLY = replace(WITHOUT_BF16, int8_dot=True)
BF16_LIMIT = 0.03  # the bf16 accuracy gate's x0 rel-L2 (calib/thresholds.py), what the issue holds the CPU path to


def _settings(**overrides) -> BuildSettings:
    # the shared folder's settings (conftest.small_artifacts), so only the new stage runs
    return BuildSettings(target=PRESETS["rtx4090"].with_range(64, 512), precision="fp16", vae_precision="fp32",
                         weights={"unet": RANDOM, "vae": RANDOM}, **overrides)


def _rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def folder(small_artifacts, small_models, tmp_path_factory) -> Path:
    """The shared small folder, rebuilt with CPU graphs: every other stage is reused."""
    out = tmp_path_factory.mktemp("cpu_graphs") / "art"
    shutil.copytree(small_artifacts, out)
    lines = []
    build_artifacts(small_models, _settings(cpu_int8=True), out, log=lines.append)
    assert any("cpu-int8: done" in line for line in lines)
    assert not any("onnx: done" in line for line in lines)  # the folder's own graphs were reused
    return out


def test_the_build_writes_uint8_activation_graphs_that_onnx_runtime_runs_on_its_integer_kernels(folder, tmp_path):
    import onnxruntime as ort

    manifest = read_manifest(folder)
    assert manifest.components["vae_decoder"].cpu_graph is None
    for name in ("cond_encoder", "unet"):
        record = manifest.components[name].cpu_graph
        assert record.built and record.precision == "cpu-int8"
        assert sha256_file(folder / record.file) == record.sha256
        assert manifest.components[name].onnx_file != record.file  # beside the folder's own graph, not instead
        graph = onnx.load(str(folder / record.file))
        assert {i.type.tensor_type.elem_type for i in graph.graph.input} == {onnx.TensorProto.FLOAT}  # fp32 float part
        points = {i.name: i.data_type for i in graph.graph.initializer if i.name.endswith("zero_point")}
        weights = {n: t for n, t in points.items() if n.endswith("weight_zero_point")}
        activations = {n: t for n, t in points.items() if n not in weights}
        assert weights and set(weights.values()) == {onnx.TensorProto.INT8}
        assert activations and set(activations.values()) == {onnx.TensorProto.UINT8}
        accuracy = record.validation["accuracy"]
        assert accuracy["precision"] == "bf16" and accuracy["passed"]
        assert accuracy["worst"]["rel_l2"] <= BF16_LIMIT
        # what makes it fast: the CPU provider fuses Q/DQ + Conv into integer convolutions
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.optimized.onnx")
        ort.InferenceSession(str(folder / record.file), options, providers=["CPUExecutionProvider"])
        fused = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
        assert fused.count("QLinearConv") >= record.validation["quantization"]["quantized_nodes"] // 2


def test_auto_runs_the_cpu_graphs_on_int8_cpus_within_the_bf16_gate_and_decodes_on_the_next_path(
        folder, small_models, monkeypatch):
    pretend_cpu(monkeypatch, WITH_BF16_AND_INT8)
    x = torch.randn(1, 32, 8, 12, generator=torch.Generator().manual_seed(2))
    reference = reference_upscale(small_models.unet, x, 2, seed=4)
    with Upscaler.load(folder, device="cpu") as auto:
        assert auto.backend_name == "onnxruntime-cpu-int8"
        got = auto.upscale(x, scale=2, seed=4)
        assert 1e-3 < _rel_l2(got, reference) < BF16_LIMIT  # int8 (not the fp16 graphs), within the gate
        assert auto.backend.opened_decoder is None  # nothing loaded for decoding until it is asked for
        image = auto.decode(got)
        assert auto.backend.opened_decoder.name == "torch-bf16"
        assert set(auto.backend.opened_decoder._modules) == {"vae_decoder"}  # the decoder alone, not the U-Net again
    with Upscaler.load(folder, backend="torch", precision="bf16", device="cpu") as bf16:
        assert _rel_l2(image, bf16.decode(got)) < 1e-6  # the decoder auto would run without the CPU graphs


def test_auto_keeps_its_other_paths_where_the_cpu_graphs_do_not_apply(folder, small_artifacts, monkeypatch):
    pretend_cpu(monkeypatch, WITH_BF16)  # no int8 dot products: MLAS's 16-bit products could saturate
    with Upscaler.load(folder, device="cpu") as auto:
        assert auto.backend_name == "torch-bf16"
    pretend_cpu(monkeypatch, INT8_ONLY)
    with Upscaler.load(folder, device="cpu", precision="fp32") as fp32:
        assert fp32.backend_name == "onnxruntime-cpu"
    with Upscaler.load(small_artifacts, device="cpu") as without:  # a folder built without them
        assert without.backend_name == "onnxruntime-cpu"
    with Upscaler.load(folder, device="cpu") as auto:  # int8 without bf16: the decoder on the fp32 path's ONNX Runtime
        assert auto.backend_name == "onnxruntime-cpu-int8"
        assert auto.backend.decoder().name == "onnxruntime-cpu"


def test_precision_int8_asks_for_the_cpu_graphs_and_says_why_it_cannot(folder, small_artifacts, monkeypatch):
    pretend_cpu(monkeypatch, WITHOUT_BF16)
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    for backend in ("onnxruntime", "auto"):
        with Upscaler.load(folder, backend=backend, precision="int8", device="cpu") as asked:
            assert asked.backend_name == "onnxruntime-cpu-int8"
            assert asked.backend.run_precision("unet") == "cpu-int8" and asked.backend.run_precision("vae_decoder") is None
            image = asked.upscale(x, decode=True)  # the folder's fp32 decoder graph, on ONNX Runtime
            assert image.shape == (1, 3, 16 * 8, 16 * 8) and torch.isfinite(image).all()
            if backend == "auto":  # decoding on what follows the CPU graphs in auto's order
                assert asked.backend.opened_decoder.name == "onnxruntime-cpu"
        with pytest.raises(BackendUnavailable, match="no CPU graphs .*--cpu-int8"):  # asked for: no other pass
            Upscaler.load(small_artifacts, backend=backend, precision="int8", device="cpu")
    with pytest.raises(InvalidArgumentError, match="precision int8 runs the folder's CPU graphs on ONNX Runtime"):
        Upscaler.load(folder, backend="torch", precision="int8", device="cpu")
    with pytest.raises(InvalidArgumentError, match="precision must be one of fp32, fp16, bf16, int8"):
        Upscaler.load(folder, precision="int4", device="cpu")


def test_a_changed_cpu_graph_is_refused_and_auto_runs_its_next_path(folder, tmp_path, monkeypatch):
    copy = tmp_path / "art"
    shutil.copytree(folder, copy)
    record = read_manifest(copy).components["unet"].cpu_graph
    with open(copy / record.file, "ab") as graph:
        graph.write(b"\0")
    with pytest.raises(BackendUnavailable, match=f"CPU graph {record.file} does not match the manifest"):
        Upscaler.load(copy, backend="onnxruntime", precision="int8", device="cpu")
    pretend_cpu(monkeypatch, WITH_BF16_AND_INT8)
    with Upscaler.load(copy, device="cpu") as auto:
        assert auto.backend_name == "torch-bf16"
        assert "does not match the manifest" in auto.skipped_backends["onnxruntime-cpu-int8"]


def test_swapped_cpu_graph_records_are_a_manifest_error_not_onnx_runtimes(folder, tmp_path, monkeypatch):
    """Each record names the other component's graph; the hashes still match the files."""
    copy = tmp_path / "art"
    shutil.copytree(folder, copy)
    document = json.loads((copy / MANIFEST_NAME).read_text())
    components = document["components"]
    components["unet"]["cpu_graph"], components["cond_encoder"]["cpu_graph"] = (
        components["cond_encoder"]["cpu_graph"], components["unet"]["cpu_graph"])
    (copy / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(ManifestError, match=r"the CPU graph the manifest names for (cond_encoder|unet) takes .* "
                                            r"the manifest names another component's graph; rebuild with"):
        Upscaler.load(copy, backend="onnxruntime", precision="int8", device="cpu")
    pretend_cpu(monkeypatch, INT8_ONLY)  # auto would run them: it must not fall past a broken folder either
    with pytest.raises(ManifestError, match="another component's graph"):
        Upscaler.load(copy, device="cpu")


def test_the_check_set_holds_the_cpu_graphs_to_int8_component_and_bf16_pass_limits(folder, monkeypatch):
    check_set = json.loads((folder / MANIFEST_NAME).read_text())["check_set"]
    assert check_set["pass"]["precision_limits"]["cpu-int8"]["rel_l2"] == thresholds.THRESHOLDS["bf16"].rel_l2
    assert check_set["components"]["unet"]["precision_limits"]["cpu-int8"]["velocity"]["rel_l2"] == 0.15
    assert "cpu-int8" not in check_set["components"]["vae_decoder"]["precision_limits"]
    pretend_cpu(monkeypatch, WITH_BF16_AND_INT8)
    with Upscaler.load(folder, device="cpu") as auto:
        result = run_check_set(auto.backend, folder, auto.manifest)
    assert result.passed and not result.notes
    held = {(o.component, o.precision) for o in result.outputs}
    assert held == {("cond_encoder", "cpu-int8"), ("unet", "cpu-int8"), ("pass", "cpu-int8"), ("vae_decoder", "bf16")}
    x0 = next(o for o in result.outputs if o.component == "pass")
    assert x0.limits["rel_l2"] == thresholds.THRESHOLDS["bf16"].rel_l2 and 1e-3 < x0.rel_l2


def test_a_gate_failure_is_recorded_not_fatal_and_an_unchanged_rebuild_does_not_retry(
        folder, small_models, tmp_path, monkeypatch):
    copy = tmp_path / "art"
    shutil.copytree(folder, copy)
    strict = thresholds.Thresholds(rel_l2=1e-6, max_abs=1e-6, psnr_db=200.0)
    monkeypatch.setitem(thresholds.THRESHOLDS, "bf16", strict)
    settings = _settings(cpu_int8=True, seed=1)  # another gate seed: a new key, so the stage runs
    lines = []
    manifest = build_artifacts(small_models, settings, copy, log=lines.append)
    record = manifest.components["unet"].cpu_graph
    assert not record.built and "failed the accuracy gate" in record.reason
    assert not list(copy.glob("onnx/*/*.cpu-int8.onnx"))  # the old ones went with the old manifest
    with pytest.raises(BackendUnavailable, match="the folder's CPU graphs were not made: they failed the accuracy gate"):
        Upscaler.load(copy, backend="onnxruntime", precision="int8", device="cpu")
    lines.clear()
    build_artifacts(small_models, settings, copy, log=lines.append)
    assert any("cpu-int8: reused" in line for line in lines)


@pytest.mark.parametrize("argv, asked", [
    ([], True), (["--no-cpu-int8"], False), (["--components", "unet", "vae_decoder"], False),
])
def test_the_cli_makes_cpu_graphs_by_default_when_both_pass_components_are_built(tmp_path, monkeypatch, argv, asked):
    import export.build as build_module

    seen = {}

    def record(models, settings, out, log=print, wait=True):
        seen["settings"] = settings
        raise BuildError("stopped by the test")

    monkeypatch.setattr(build_module, "build_artifacts", record)
    monkeypatch.setattr(build_module, "load_unet", lambda *args, **kwargs: None)
    monkeypatch.setattr(build_module, "load_vae", lambda *args, **kwargs: None)
    assert build_main(["--target", "rtx4090", "--random-weights", "--out", str(tmp_path / "art"), *argv]) == 1
    assert seen["settings"].cpu_int8 is asked
    assert ("--no-cpu-int8" in seen["settings"].rebuild_command) == ("--no-cpu-int8" in argv)


def test_the_cli_refuses_cpu_graphs_without_both_pass_components(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--target", "rtx4090", "--random-weights", "--out", str(tmp_path / "art"),
                    "--components", "vae_decoder", "--cpu-int8"])
    assert exit_info.value.code == 2
    assert "--cpu-int8 quantizes cond_encoder and unet together" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


def test_the_library_refuses_cpu_graphs_without_both_pass_components(small_models, tmp_path):
    with pytest.raises(BuildError, match="CPU int8 graphs quantize cond_encoder and unet together"):
        build_artifacts(small_models, _settings(cpu_int8=True, components=("unet", "vae_decoder")), tmp_path / "art")


def test_calib_quantize_refuses_a_gpu_target_for_cpu_graphs(tmp_path, capsys):
    from export.quantize import main as quantize_main

    with pytest.raises(SystemExit) as exit_info:
        quantize_main(["--precision", "cpu-int8", "--target", "rtx5090", "--random-weights", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "cpu-int8 graphs are for ONNX Runtime's CPU provider" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_quantizer_refuses_unsigned_fp8_activations(tmp_path):
    from calib.quantize import QuantizationError, quantize_graph

    with pytest.raises(QuantizationError, match="unsigned activations are int8 only"):
        quantize_graph(tmp_path / "none.onnx", tmp_path / "out.onnx", "unet", "fp8", [{}], unsigned_activations=True)


def test_a_folder_with_one_cpu_graph_or_a_rebuild_without_them(folder, small_models, tmp_path, monkeypatch):
    copy = tmp_path / "art"
    shutil.copytree(folder, copy)
    pretend_cpu(monkeypatch, WITH_BF16_AND_INT8)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    del data["components"]["unet"]["cpu_graph"]  # as if hand-edited: auto must not run half a pass on them
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    with Upscaler.load(copy, device="cpu") as auto:
        assert auto.backend_name == "torch-bf16"
    old = read_manifest(folder).components["cond_encoder"].cpu_graph.file
    build_artifacts(small_models, _settings(), copy, log=lambda line: None)  # cpu_int8 off
    assert read_manifest(copy).components["cond_encoder"].cpu_graph is None and not (copy / old).exists()


def test_closing_frees_the_decoder_and_later_use_says_closed(folder, monkeypatch):
    pretend_cpu(monkeypatch, WITH_BF16_AND_INT8)
    auto = Upscaler.load(folder, device="cpu")
    backend = auto.backend
    backend.check("vae_decoder")  # opens it
    decoder = backend.opened_decoder
    auto.close()
    assert backend.opened_decoder is None and not decoder._modules  # the torch backend's modules are gone
    with pytest.raises(BackendUnavailable, match="backend is closed"):
        backend.check("vae_decoder")
