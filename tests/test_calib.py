"""Calibration sets, INT8/FP8 Q/DQ quantization in ONNX Runtime (CPU), and the accuracy gate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from calib.accuracy import THRESHOLDS, AccuracyGateError, graphs_run, measure
from calib.data import CalibrationError, load_calibration_set
from calib.quantize import kept_nodes
from export.accuracy import main as accuracy_main
from export.pipeline.quantize import quantize_components
from export.quantize import main as quantize_main
from export.reference import pass_reference
from export.onnx.components import COMPONENTS
from export.onnx.exporter import export_component
from runtime.latents import pack, write_latents


def _latents(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_calibration_files_are_read_split_and_selected_deterministically(tmp_path):
    write_latents(tmp_path / "b.safetensors", _latents(3, 32, 8, 12, seed=1))
    write_latents(tmp_path / "a.safetensors", pack(_latents(2, 32, 8, 8, seed=2)))  # packed form
    every = load_calibration_set([tmp_path], size=10)
    assert len(every.samples) == 5 and all(s.shape[:2] == (1, 32) for s in every.samples)
    # sorted by path: a (unpacked back to 32 channels) first
    assert torch.equal(every.samples[0], _latents(2, 32, 8, 8, seed=2)[:1])
    chosen = load_calibration_set([tmp_path], size=3, seed=7)
    again = load_calibration_set([tmp_path / "b.safetensors", tmp_path / "a.safetensors"], size=3, seed=7)
    assert len(chosen.samples) == 3 and chosen.digest() == again.digest()
    assert all(any(torch.equal(c, s) for s in every.samples) for c in chosen.samples)
    assert load_calibration_set([tmp_path], size=3, seed=8).digest() != chosen.digest()


def test_fallback_and_bad_calibration_input(tmp_path):
    fallback = load_calibration_set(None, size=2, seed=0, side=8)
    assert [tuple(s.shape) for s in fallback.samples] == [(1, 32, 8, 8)] * 2 and "standard normal" in fallback.source
    assert 0.8 < float(torch.cat(fallback.samples).std()) < 1.2
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration_set([tmp_path / "missing.safetensors"])
    with pytest.raises(CalibrationError, match="holds no .safetensors"):
        load_calibration_set([tmp_path])
    write_latents(tmp_path / "wrong.safetensors", _latents(1, 16, 8, 8))
    with pytest.raises(CalibrationError, match=r"wrong.safetensors.*\[B, 32, H, W\]"):
        load_calibration_set([tmp_path])


@pytest.fixture(scope="module")
def calibration():
    return load_calibration_set(None, size=4, seed=0, side=8)


@pytest.fixture(scope="module")
def int8_graphs(small_models, calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    results, report = quantize_components(small_models, "int8", calibration, out, log=lambda line: None)
    return out, results, report


def test_int8_unet_runs_in_onnxruntime_within_the_documented_bound(small_models, calibration, int8_graphs):
    out, results, report = int8_graphs
    unet = onnx.load(str(results["unet"].path))
    ops = {n.op_type for n in unet.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [i for i in unet.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= results["unet"].quantized_nodes > 10
    # the float part is the fp16 export (fp16 scales, opset 19), so TensorRT runs it in fp16
    scales = [i for i in unet.graph.initializer if i.name.endswith("_scale")]
    assert scales and {i.data_type for i in scales} == {onnx.TensorProto.FLOAT16}
    assert any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in unet.graph.input)  # cond, lr1..3
    assert next(o.version for o in unet.opset_import if o.domain in ("", "ai.onnx")) == 19
    # symmetric: every zero point is 0, as TensorRT requires
    zero_points = [numpy_helper.to_array(i) for i in unet.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(not np.any(z) for z in zero_points)
    # the gate ran both graphs against the fp32 eager pass: measurably different, inside the int8 bound
    worst = report.worst
    assert report.passed and 1e-4 < worst["rel_l2"] <= THRESHOLDS["int8"].rel_l2
    # and an independent run of the written graphs agrees with the report
    again = measure(graphs_run({c: r.path for c, r in results.items()}), pass_reference(small_models.unet), calibration, "int8")
    assert again.worst["rel_l2"] == pytest.approx(worst["rel_l2"], rel=1e-6)


def test_keep_groups_find_the_first_and_last_convolutions_and_the_time_path(small_models, tmp_path):
    path = export_component(COMPONENTS["unet"], small_models, "fp32", tmp_path / "unet.fp32.onnx").path
    model = onnx.load(str(path))
    kept = kept_nodes(model, ["first_conv", "last_conv", "time_embedding"])
    by_name = {n.name: n for n in model.graph.node}
    initializers = {i.name: tuple(i.dims) for i in model.graph.initializer}

    def weight_shape(name):
        return next(initializers[i] for i in by_name[name].input if i in initializers and len(initializers[i]) >= 2)

    base = small_models.unet.config["base_channels"]
    # in_conv maps the 32 sample channels to base channels with a 1x1 kernel; out_conv the reverse
    assert (base, 32, 1, 1) in [weight_shape(n) for n in kept["first_conv"]]
    assert [weight_shape(n) for n in kept["last_conv"]] == [(32, base, 1, 1)]
    # the time path: the per-block projections of cond, matrix products on the [B, cond_dim] vector
    assert kept["time_embedding"] and all(by_name[n].op_type in ("Gemm", "MatMul") for n in kept["time_embedding"])
    assert not set(kept["time_embedding"]) & set(kept["first_conv"] + kept["last_conv"])


def test_gate_refuses_a_graph_with_a_wrong_scale(small_models, calibration, int8_graphs, tmp_path):
    out, results, _ = int8_graphs
    unet = onnx.load(str(results["unet"].path))
    scales = [i for i in unet.graph.initializer if i.name.endswith("_scale")]
    damaged = max(scales, key=lambda i: numpy_helper.to_array(i).size)  # a per-channel weight scale
    damaged.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(damaged) * 8, damaged.name))
    onnx.save(unet, str(tmp_path / "unet.damaged.onnx"))
    run = graphs_run({"cond_encoder": results["cond_encoder"].path, "unet": tmp_path / "unet.damaged.onnx"})
    report = measure(run, pass_reference(small_models.unet), calibration, "int8")
    assert not report.passed
    assert report.worst["rel_l2"] > THRESHOLDS["int8"].rel_l2
    with pytest.raises(AccuracyGateError, match=r"int8 accuracy .* FAILED: rel-L2 [0-9.]+ > 0.06"):
        report.check()


def test_fp8_quantizes_and_runs_on_the_cpu(small_models, calibration, tmp_path):
    results, report = quantize_components(small_models, "fp8", calibration, tmp_path, log=lambda line: None)
    unet = onnx.load(str(results["unet"].path))
    assert any(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in unet.graph.initializer)
    assert report.passed and report.worst["rel_l2"] > 1e-4


def test_fp8_is_refused_below_compute_capability_8_9(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quantize_main(["--precision", "fp8", "--target", "rtx3090", "--out", str(tmp_path), "--random-weights"])
    assert exit_info.value.code == 2
    assert "fp8 needs compute capability >= 8.9" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_accuracy_cli_gates_an_artifact_folder(small_artifacts, tmp_path, capsys):
    report_path = tmp_path / "accuracy.json"
    code = accuracy_main([str(small_artifacts), "--backend", "onnxruntime", "--device", "cpu", "--calib-size", "2",
                          "--json", str(report_path)])
    assert code == 0
    result = json.loads(report_path.read_text())
    assert result["precision"] == "fp16" and result["passed"] and len(result["samples"]) == 2
    assert 0 < result["worst"]["rel_l2"] <= THRESHOLDS["fp16"].rel_l2
    assert "passed" in capsys.readouterr().out
    # the fp16 folder judged by the fp32 limits fails, and says by how much
    assert accuracy_main([str(small_artifacts), "--device", "cpu", "--calib-size", "2", "--precision", "fp32"]) == 1
    assert "FAILED: rel-L2" in capsys.readouterr().out

